"""The one-pass cross-entropy equals F.cross_entropy, value and gradient, with ignored targets."""

import torch
import torch.nn.functional as F

from chiarformer.loss import cross_entropy


def test_cross_entropy_matches_torch_and_passes_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(37, 101, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 101, (37,))
    targets[3:9] = -100
    ours, ref = cross_entropy(logits, targets), F.cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(2 * ours, logits)[0], torch.autograd.grad(2 * ref, logits)[0])
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, targets), (logits,))
