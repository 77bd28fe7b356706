"""ChiarForCausalLM.generate (eval mode, EOS, top-p, seeds, left-padded batches, cached == uncached) and `chiar generate`."""

import subprocess
import sys

import pytest
import torch

from chiarformer import ChiarConfig, ChiarForCausalLM
from chiarformer.cli import main
from chiarformer.errors import UserError
from chiarformer.model import KVCache
from chiarformer.operators import RBF, Op
from chiarformer.sampling import next_tokens
from chiarformer.train.runs import load_run

from corpus import train_tiny_lm

# Routed layouts with a causal MetaRouter (its prefix mean must skip padding); the taus sit
# inside the entropy spread of these small random models, so both operators are chosen.
ROUTED = [
    dict(layout="D,DA,DA,A", tau=[0.8, 0.8], meta_router="causal"),
    dict(layout="DA,RA,A", n_layers=3, tau=[0.8, 0.8], routing="threshold"),
    dict(layout="D,DA,DA,A", routing="soft", norm="pre"),
]


def model_for(seed=0, **overrides):
    values = dict(vocab_size=61, d_model=32, n_heads=2, n_layers=4, max_seq_len=64, dropout=0.0, rbf_features=16)
    torch.manual_seed(seed)
    return ChiarForCausalLM(ChiarConfig(**{**values, **overrides})).eval()


def left_pad(prompts, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def assert_both_operators_chosen(model, ids, mask):
    """Real (non-pad) tokens of some routed layer go to two different operators."""
    with torch.no_grad():
        routing = model(ids, attention_mask=mask).routing
    real = mask.bool()
    chosen = [set(routing[i].ops[real].tolist()) for i in model.cfg.routed_layers]
    assert any(len(ops) >= 2 for ops in chosen), chosen


@pytest.mark.parametrize("case", range(len(ROUTED)))
def test_left_padded_batch_cached_equals_uncached_and_each_prompt_alone(case):
    overrides = dict(ROUTED[case])
    model = model_for(case, **overrides)
    if model.model.meta_router is not None:  # its init gives a constant gate; make it depend on the mean
        torch.nn.init.normal_(model.model.meta_router.gate.weight, std=10.0)
        torch.nn.init.normal_(model.model.layers[0].dct.filter, 1.0, 0.3)  # and the gated layer differ from identity
    g = torch.Generator().manual_seed(case)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 9, 6)]
    ids, mask = left_pad(prompts, pad_id=0)
    tokens = model.generate(ids, max_new_tokens=12, temperature=0, attention_mask=mask)
    assert tokens.shape == (3, ids.shape[1] + 12) and torch.equal(tokens[:, : ids.shape[1]], ids)

    # Uncached: one forward over prompt + continuation with the padding mask; greedy = its argmax.
    full_mask = torch.cat([mask, torch.ones(3, 12, dtype=torch.long)], 1)
    assert_both_operators_chosen(model, tokens, full_mask)
    with torch.no_grad():
        full = model(tokens, attention_mask=full_mask).logits
        cache = KVCache.empty(model.cfg.n_layers)
        steps = [model(ids, attention_mask=mask, cache=cache).logits]
        steps += [model(tokens[:, i : i + 1], cache=cache).logits for i in range(ids.shape[1], tokens.shape[1])]
    real = full_mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-4, rtol=0)
    assert torch.equal(full[:, ids.shape[1] - 1 : -1].argmax(-1), tokens[:, ids.shape[1] :])
    assert not torch.isnan(full).any()  # pads that see only pads must not poison real tokens

    if RBF in {op for ops in model.cfg.layer_ops for op in ops}:
        return  # random RBF features are not shift-invariant: padding moves positions (docs/generation.md)
    # Each prompt alone gives the same logits and continuation as in the padded batch.
    for row, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=12, temperature=0)
        assert torch.equal(alone[0, len(p) :], tokens[row, ids.shape[1] :]), row
        with torch.no_grad():
            torch.testing.assert_close(model(alone).logits[0], full[row, ids.shape[1] - len(p) :], atol=1e-5, rtol=0)


def test_generate_uses_eval_mode_and_restores_the_previous_mode():
    model = model_for(dropout=0.5, layout="D,DA,DA,A", tau=[0.8, 0.8]).train()
    prompt = torch.randint(0, 61, (2, 4))
    first = model.generate(prompt, max_new_tokens=8, temperature=0)
    second = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert model.training
    assert torch.equal(first, second)  # with dropout active two greedy runs would differ
    model.eval()
    assert torch.equal(model.generate(prompt, max_new_tokens=8, temperature=0), first)
    assert not model.training


def test_seed_reproduces_samples_and_leaves_the_global_rng_alone():
    model = model_for(layout="baseline")
    prompt = torch.randint(0, 61, (4, 3))
    state = torch.get_rng_state()
    a = model.generate(prompt, max_new_tokens=10, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = model.generate(prompt, max_new_tokens=10, temperature=1.0, seed=7)
    c = model.generate(prompt, max_new_tokens=10, temperature=1.0, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_stops_each_sequence_and_pads_it():
    model = model_for(layout="baseline")
    prompt = torch.randint(0, 61, (6, 3))
    free = model.generate(prompt, max_new_tokens=15, temperature=1.0, seed=0)
    eos = int(free[0, 5])  # a token that sequence 0 produces at its third step
    out = model.generate(prompt, max_new_tokens=15, temperature=1.0, seed=0, eos_token_id=eos, pad_token_id=60)
    for row in range(6):
        gen = out[row, 3:].tolist()
        if eos in gen:
            stop = gen.index(eos)
            assert gen[: stop + 1] == free[row, 3 : 3 + stop + 1].tolist()
            assert all(t == 60 for t in gen[stop + 1 :])
        else:
            assert gen == free[row, 3 : 3 + len(gen)].tolist() and out.shape[1] == free.shape[1]
    # Row 0 really stopped at its EOS and was padded afterwards (pad 60 is not its next token).
    stop0 = free[0, 3:].tolist().index(eos)
    assert out.shape[1] > 4 + stop0 and (out[0, 4 + stop0 :] == 60).all()
    assert free[0, 4 + stop0 :].ne(60).any()
    # Every sequence finished: decoding stopped before max_new_tokens.
    greedy = model.generate(prompt[:1], max_new_tokens=15, temperature=0)[0, 3:].tolist()
    stop = greedy.index(greedy[4])
    alone = model.generate(prompt[:1], max_new_tokens=15, temperature=0, eos_token_id=greedy[4])
    assert alone[0, 3:].tolist() == greedy[: stop + 1]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([next_tokens(logits, 1.0, None, 0.75, g) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75; 0.15 and 0.05 never drawn
    draws = torch.stack([next_tokens(logits, 1.0, None, 0.4, g) for _ in range(50)])
    assert set(draws.flatten().tolist()) == {0}
    draws = torch.stack([next_tokens(logits, 1.0, 3, 1.0, g) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1, 2}


def test_bad_sampling_arguments_and_right_padding_are_clear_errors():
    model = model_for(layout="baseline")
    prompt = torch.randint(0, 61, (2, 4))
    for kwargs, match in [(dict(top_p=0.0), "top_p"), (dict(top_k=0), "top_k"), (dict(temperature=-1.0), "temperature")]:
        with pytest.raises(UserError, match=match):
            model.generate(prompt, max_new_tokens=2, **kwargs)
    with pytest.raises(UserError, match="left"):
        model.generate(prompt, max_new_tokens=2, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))



# ---------------------------------------------------------------- chiar generate
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_lm(tmp_path_factory.mktemp("generate"))


def test_generate_command_samples_reproducibly_and_shows_routing(run, tmp_path, capsys):
    argv = ["generate", "--run", str(run), "the cat", "--max-new-tokens", "12", "--top-k", "20", "--top-p", "0.9",
            "--num-samples", "2", "--seed", "5"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # same seed, same samples
    assert first.count("--- sample") == 2 and first.count("\nthe cat") + first.startswith("the cat") == 2

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the dog")
    assert main(["generate", "--run", str(run), "--prompt-file", str(prompt), "--temperature", "0",
                 "--max-new-tokens", "6", "--show-routing"]) == 0
    lines = capsys.readouterr().out.splitlines()
    loaded = load_run(run)
    greedy = loaded.model.generate(torch.tensor([loaded.tokenizer.encode("the dog")]), 6, temperature=0,
                                   eos_token_id=loaded.tokenizer.eot_id)
    generated = greedy[0, 7:].tolist()
    assert lines[0] == "the dog" + loaded.tokenizer.decode(generated)
    assert lines[1].split() == ["#", "token", "L2:DA"]  # dct_attn with 3 layers: layer 2 routes D/A
    rows = lines[2 : 2 + len(generated)]
    with torch.no_grad():
        ops = loaded.model(greedy, return_routing=True).routing[1].ops[0, 7:].tolist()
    assert [row.split()[-1] for row in rows] == [Op(op).letter for op in ops]
    assert lines[2 + len(generated)].startswith("generated tokens to attention: L2 ")


@pytest.mark.parametrize("argv, fragment", [
    (["--prompt-file", "missing.txt"], "not found"),
    (["--top-p", "1.5"], "top_p"),
    (["--max-new-tokens", "1000"], "max_seq_len"),
    (["--num-samples", "0"], "num-samples"),
])
def test_generate_command_errors_are_one_line(run, capsys, argv, fragment):
    assert main(["generate", "--run", str(run), "x", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_core_imports_without_transformers_and_export_names_the_extra(run, tmp_path):
    script = f"""
import sys
sys.modules["transformers"] = None  # as if not installed
import chiarformer, chiarformer.cli
code = chiarformer.cli.main(["export", "--run", {str(run)!r}, "--out", {str(tmp_path / "out")!r}])
sys.exit(code)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and 'pip install -e ".[hf]"' in proc.stderr, proc.stderr
