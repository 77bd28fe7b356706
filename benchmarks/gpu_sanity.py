"""Correctness on a GPU: the checks of tests/test_model.py that depend on kernels, run on CUDA.

CI has no GPU, so this is run by hand on one: sparse == dense execution (fp32), causality
(fp32, both executions, every layout and causal routing mode), the two DCT implementations
agree, a bf16-autocast training step of paper-17m is finite with fp32 routing entropies, and
sparse and dense execution give the same gradients. Prints one line per check.
Usage: python benchmarks/gpu_sanity.py
"""

from __future__ import annotations

import itertools

import torch

from chiarformer import ChiarConfig, ChiarForCausalLM


def small(layout: str, routing: str, **kw) -> ChiarConfig:
    return ChiarConfig.from_preset("tiny", vocab_size=97, d_model=64, layout=layout, routing=routing, tau=None,
                                   max_seq_len=256, **kw)


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    worst_dense, worst_causal = 0.0, 0.0
    for layout, routing in itertools.product(["baseline", "dct_attn", "three_op", "D,DA,DRA,A"], ["threshold", "soft", "hard"]):
        torch.manual_seed(0)
        cfg = small(layout, routing)
        sparse = ChiarForCausalLM(cfg).to(dev).eval()
        dense = ChiarForCausalLM(cfg.replace(execution="dense")).to(dev).eval()
        dense.load_state_dict(sparse.state_dict())
        ids = torch.randint(0, 97, (4, 200), device=dev)
        changed = ids.clone()
        changed[:2, 101:] = torch.randint(0, 97, (2, 99), device=dev)
        with torch.no_grad():
            a, b = sparse(ids).logits, dense(ids).logits
            worst_dense = max(worst_dense, (a - b).abs().max().item())
            for m, same in ((sparse, a), (dense, b)):
                c = m(changed).logits
                leak = max((same[:2, :101] - c[:2, :101]).abs().max().item(), (same[2:] - c[2:]).abs().max().item())
                worst_causal = max(worst_causal, leak)
    print(f"sparse vs dense, max |diff| over layouts x routings (fp32): {worst_dense:.2e}  "
          f"{'OK' if worst_dense < 1e-5 else 'FAIL'}")
    print(f"causality, max change at positions <= t (fp32): {worst_causal:.2e}  {'OK' if worst_causal < 1e-5 else 'FAIL'}")

    torch.manual_seed(0)
    cfg = small("dct_attn", "threshold", dct_impl="matmul")
    mm = ChiarForCausalLM(cfg).to(dev).eval()
    fft = ChiarForCausalLM(cfg.replace(dct_impl="fft")).to(dev).eval()
    fft.load_state_dict(mm.state_dict())
    ids = torch.randint(0, 97, (4, 200), device=dev)
    with torch.no_grad():
        diff = (mm(ids).logits - fft(ids).logits).abs().max().item()
    print(f"DCT matmul vs fft, max |diff| (fp32): {diff:.2e}  {'OK' if diff < 1e-4 else 'FAIL'}")

    model = ChiarForCausalLM(ChiarConfig.from_preset("paper-17m", layout="dct_attn", routing="hard")).to(dev).train()
    ids = torch.randint(0, 50257, (8, 256), device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels=ids, return_routing=True)
    (out.loss + out.aux_loss).backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    fp32_entropy = all(r.entropy.dtype == torch.float32 for r in out.routing if r.entropy is not None)
    ok = grads_finite and fp32_entropy
    print(f"paper-17m bf16 autocast step: loss {out.loss.item():.3f}, grads finite: {grads_finite}, "
          f"entropy fp32: {fp32_entropy}  {'OK' if ok else 'FAIL'}")

    torch.manual_seed(0)
    cfg = small("D,DA,DRA,A", "hard")
    sparse = ChiarForCausalLM(cfg).to(dev).train()
    dense = ChiarForCausalLM(cfg.replace(execution="dense")).to(dev).train()
    dense.load_state_dict(sparse.state_dict())
    ids = torch.randint(0, 97, (4, 200), device=dev)
    for m in (sparse, dense):
        m(ids, labels=ids).loss.backward()
    worst = max((a.grad - b.grad).abs().max().item()
                for a, b in zip(sparse.parameters(), dense.parameters(), strict=True) if a.grad is not None)
    print(f"sparse vs dense gradients, max |diff| (fp32): {worst:.2e}  {'OK' if worst < 1e-4 else 'FAIL'}")


if __name__ == "__main__":
    main()
