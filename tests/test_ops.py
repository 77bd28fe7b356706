import numpy as np
import pytest
import scipy.fft
import torch

from chiarformer.config import gaussian_entropy
from chiarformer.ops import dct, idct, spectral_entropy


@pytest.mark.parametrize("impl", ["matmul", "fft"])
@pytest.mark.parametrize("d", [2, 7, 64, 255, 256])
def test_dct_matches_scipy_ortho_and_inverts(d, impl):
    x = torch.randn(5, 3, d, dtype=torch.float64)
    expected = scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=-1)
    atol = 1e-10 if impl == "matmul" else 1e-5  # the FFT path runs in complex64
    np.testing.assert_allclose(dct(x, impl).numpy(), expected, atol=atol)
    torch.testing.assert_close(idct(dct(x, impl), impl), x, atol=atol, rtol=0)


def test_dct_is_orthonormal_so_energy_is_kept():
    x = torch.randn(10, 128)
    torch.testing.assert_close(dct(x).square().sum(-1), x.square().sum(-1), rtol=1e-4, atol=1e-4)


def test_entropy_extremes_and_range():
    d = 64
    constant = torch.ones(d)  # all energy in the DC coefficient
    assert spectral_entropy(constant).item() == pytest.approx(0.0, abs=1e-6)
    flat_spectrum = idct(torch.ones(d))  # equal energy in every coefficient
    assert spectral_entropy(flat_spectrum).item() == pytest.approx(1.0, abs=1e-5)
    h = spectral_entropy(torch.randn(1000, d))
    assert bool(((h >= 0) & (h <= 1)).all())


def test_entropy_of_gaussian_vectors_matches_the_closed_form():
    # SPEC §3.4: about 0.87 at d=256, 0.895 at d=1024, spread about 0.01.
    for d in (256, 1024):
        h = spectral_entropy(torch.randn(4000, d))
        assert h.mean().item() == pytest.approx(gaussian_entropy(d), abs=3e-3)
        assert h.std().item() < 0.015


def test_entropy_safe_for_zero_vectors_and_half_precision():
    zeros = torch.zeros(3, 32)
    h = spectral_entropy(zeros)
    assert torch.isfinite(h).all() and (h == 0).all()
    x = torch.randn(8, 256)
    for dtype in (torch.float16, torch.bfloat16):
        h_half = spectral_entropy(x.to(dtype))
        assert h_half.dtype == torch.float32
        torch.testing.assert_close(h_half, spectral_entropy(x), atol=5e-3, rtol=0)
    tiny = torch.full((2, 16), 1e-30)
    assert torch.isfinite(spectral_entropy(tiny)).all()
