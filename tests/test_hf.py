"""Hugging Face transformers adapter, `chiar export`, and lm-evaluation-harness (skipped without them)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import chiarformer.hf as H  # noqa: E402
from chiarformer import ChiarConfig, ChiarForCausalLM, ChiarForSequenceClassification  # noqa: E402
from chiarformer.cli import main  # noqa: E402
from chiarformer.data.tokenizer import ByteTokenizer  # noqa: E402
from chiarformer.errors import UserError  # noqa: E402
from chiarformer.hf_export import hf_tokenizer  # noqa: E402

from corpus import train_tiny_lm  # noqa: E402

SMALL = dict(vocab_size=61, d_model=32, n_heads=2, n_layers=4, max_seq_len=64, dropout=0.0, layout="D,DA,DA,A",
             tau=[0.8, 0.8], meta_router="causal")


def routed_model(cls=ChiarForCausalLM, **overrides):
    torch.manual_seed(0)
    model = cls(ChiarConfig(**{**SMALL, **overrides})).eval()
    if model.model.meta_router is not None:  # a gate that depends on its input
        torch.nn.init.normal_(model.model.meta_router.gate.weight, std=1.0)
    return model


def assert_routes(model, ids, mask=None):
    with torch.no_grad():
        routing = model(ids, attention_mask=mask, return_routing=True).routing
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert any(len(set(routing[i].ops[real].tolist())) == 2 for i in model.cfg.routed_layers)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # Context 32, stride 31: the windows lm-eval's loglikelihood_rolling uses with max_length=31.
    return train_tiny_lm(tmp_path_factory.mktemp("hf"), "data.eval_stride=31")


def test_save_and_load_with_auto_classes_keeps_the_logits(tmp_path):
    ours = routed_model()
    ids = torch.randint(0, 61, (2, 20))
    assert_routes(ours, ids)
    H.wrap(ours).save_pretrained(tmp_path / "lm")
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert config["model_type"] == "chiarformer" and config["auto_map"]["AutoModelForCausalLM"] == "hf.ChiarHFForCausalLM"
    assert (tmp_path / "lm" / "model.safetensors").is_file() and (tmp_path / "lm" / "hf.py").is_file()
    assert AutoConfig.from_pretrained(tmp_path / "lm").chiar_config == ours.cfg
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert isinstance(back, H.ChiarHFForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
        loss = back(ids, labels=ids).loss
    torch.testing.assert_close(loss, ours(ids, labels=ids).loss)

    # A language model as the backbone of a new classifier: its weights kept, a fresh N(0, 0.02) head.
    started = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=5)
    assert torch.equal(started.chiar.model.embed.weight, ours.model.embed.weight)
    assert started.chiar.head[-1].weight.shape == (5, 32) and 0.01 < float(started.chiar.head[0].weight.detach().std()) < 0.03

    # The loss to train on includes the collapse regulariser, as in chiarformer's training loop.
    soft = routed_model(routing="soft", tau=None, collapse_reg=0.01)
    out = soft(ids, labels=ids)
    assert float(out.aux_loss.detach()) != 0.0
    torch.testing.assert_close(H.wrap(soft)(ids, labels=ids).loss, out.loss + out.aux_loss)

    classifier = routed_model(ChiarForSequenceClassification, n_classes=3)
    H.wrap(classifier).save_pretrained(tmp_path / "cls")
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    with torch.no_grad():
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, classifier(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=0)


def test_hf_generate_with_cache_matches_ours_and_uncached_decoding():
    ours = routed_model()
    hf = H.wrap(ours)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 61, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0  # left padding: prompts of 5, 9 and 7 tokens
    ids[2, :2], mask[2, :2] = 0, 0
    common = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = hf.generate(ids, **common)
    uncached = hf.generate(ids, use_cache=False, **common)
    assert_routes(ours, cached, torch.cat([mask, torch.ones(3, 12, dtype=mask.dtype)], 1))
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ours.generate(ids, 12, temperature=0, attention_mask=mask))
    # Beam search reorders the cache between steps (ChiarCache.reorder_cache).
    beams = dict(num_beams=3, max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=mask)
    assert torch.equal(hf.generate(ids, **beams), hf.generate(ids, use_cache=False, **beams))


def test_hf_generate_refuses_routes_that_need_the_whole_sequence():
    topk = H.wrap(routed_model(routing="topk", tau=None, meta_router="none", allow_noncausal=True))
    ids = torch.randint(0, 61, (1, 5))
    with pytest.raises(UserError, match="topk"):
        topk.generate(ids, max_new_tokens=2)
    assert topk.generate(ids, max_new_tokens=2, use_cache=False).shape == (1, 7)  # whole-sequence passes are fine


def test_exported_tokenizers_give_our_ids(tmp_path):
    from chiarformer.data import gpt2_tokenizer

    text = "Hello world! The café's naïve coöperation, 12,345 items.\n\n  Spaces  and\ttabs; 日本語"
    tokenizers = [ByteTokenizer()]
    try:
        tokenizers.append(gpt2_tokenizer())
    except UserError:
        pass  # no GPT-2 files on this machine
    for tok in tokenizers:
        hf_tokenizer(tok).save_pretrained(tmp_path / tok.name)
        back = AutoTokenizer.from_pretrained(tmp_path / tok.name)
        ids = back(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text) and back.decode(ids) == text
        assert back.eos_token_id == tok.eot_id and len(back) == tok.vocab_size


def test_export_loads_in_a_fresh_process_with_trust_remote_code(run, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2  # not into a non-empty folder
    script = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
ids = tok("the cat", return_tensors="pt")["input_ids"]
gen = model.generate(ids, max_new_tokens=16, do_sample=False)
print(json.dumps({{"ids": gen[0].tolist(), "text": tok.decode(gen[0]), "cls": type(model).__module__}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cls"].startswith("transformers_modules")  # the folder's copy of hf.py, not the installed one
    from chiarformer.train.runs import load_run

    loaded = load_run(run)
    prompt = torch.tensor([loaded.tokenizer.encode("the cat")])
    ours = loaded.model.generate(prompt, 16, temperature=0, eos_token_id=loaded.tokenizer.eot_id)
    assert result["ids"] == ours[0].tolist()
    assert result["text"] == loaded.tokenizer.decode(ours[0])


def test_import_chiarformer_registers_the_auto_classes_without_importing_transformers(run, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    script = f"""
import json, sys
import chiarformer
before = "transformers" in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r})
print(json.dumps({{"before": before, "cls": type(model).__module__ + "." + type(model).__name__}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"before": False, "cls": "chiarformer.hf.ChiarHFForCausalLM"}


def test_lm_eval_rolling_loglikelihood_equals_chiar_eval(run, tmp_path, capsys):
    """lm-eval's loglikelihood_rolling (max_length L) == `chiar eval` with context L + 1, stride L.

    lm-eval scores every token of a text once, in disjoint windows of L predictions; the first
    token is predicted from a prefix token, each later window from the tokens before it (L of
    them). chiar eval never scores the first token of its split and scores the rest in windows
    of L + 1 tokens that overlap by one, so the two agree when lm-eval's prefix token is the
    split's first token and its text is the rest.
    """
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from chiarformer.hf_export import export_run

    assert main(["eval", "--run", str(run), "--split", "val", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["protocol"]["context"] == 32 and record["protocol"]["stride"] == 31 and record["complete"]
    chiar_total = record["loss"] * record["tokens"]

    export_run(run, tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "exported")
    text = (run.parent / "val.txt").read_text()
    first = ByteTokenizer().encode(text)[0]
    lm = HFLM(pretrained=model, tokenizer=tok, max_length=31, batch_size=8, prefix_token_id=first)
    [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text[1:],), 0)], disable_tqdm=True)
    assert record["tokens"] == len(text.encode()) - 1
    assert -total == pytest.approx(chiar_total, rel=1e-5)
