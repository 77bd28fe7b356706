"""The experiment matrix of `chiar reproduce`: the paper's claims E1-E8 and, per scale, the runs
that test them (task, model, overrides, seeds) with the reasons for every reduction.

Scales:
    paper  the published protocol (SPEC §2): paper-17m, GPT-2 BPE, context 256, 128 sequences per
           step, lr 1e-4, warm-up 500, cosine to 1e-6, 10 epochs (LM); 4 epochs at 5e-5 (IMDB).
           Needs a GPU and the data (WikiText-103, WikiText-2 train).
    cpu    a reduced protocol that runs on 2 CPU cores: paper-17m architecture, ~0.5-1M training
           tokens per LM run, proxies for the data that is missing here.
    smoke  every run for a few steps on tiny dimensions (the CI test).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError

SCALES = ("smoke", "cpu", "paper")
DEFAULT_SEEDS = {"smoke": 1, "cpu": 3, "paper": 3}


@dataclass(frozen=True)
class Claim:
    id: str
    title: str
    paper: str  # the paper's number or statement (SPEC §2; second-hand ones say so)


CLAIMS = {c.id: c for c in [
    Claim("E1", "small-data LM: full attention wins on small corpora",
          "WikiText-2 test PPL 75.19 (full attention) vs 83.81 (DCT+Attn)"),
    Claim("E2", "larger naturalistic LM: DCT+Attn beats full attention",
          "WikiText-103 val PPL 36.54 (DCT+Attn) vs 66.62 (full attention) at 17M"),
    Claim("E3", "three-operator routing collapses: the router rejects RBF",
          "RBF gets ~0% of tokens (qualitative); Table 1 rows Soft, Hard, Threshold, Threshold+Reg "
          "(second-hand: threshold variant val PPL 40.55 vs 36.54)"),
    Claim("E4", "the entropy signal matters (the paper's premise, never tested there)",
          "implied: routing by spectral entropy beats content-blind routing at the same attention share"),
    Claim("E5", "classification: full attention keeps an edge on IMDB and ListOps",
          "qualitative; second-hand: IMDB within 1.2%, flat ListOps 63.35% (CHIAR) vs 98.85% (full attention)"),
    Claim("E6", "MetaRouter gate and mixed-dataset training",
          "gate settles near 0.22; v2 mixed-data CHIAR 28.56 test PPL vs 27.51 WT-only at 400M"),
    Claim("E7", "tau calibration as published gives the 25% attention share",
          "tau_low/high = 33rd/67th percentiles of a trained baseline's embedding entropies "
          "(second-hand: 0.855/0.865 at d=256); 25% of tokens to attention"),
    Claim("E8", "compute saved",
          "62.5% fewer attention FLOPs (17M); ~37% total FLOPs (400M)"),
]}


@dataclass(frozen=True)
class RunSpec:
    """One training run: what `chiar train` gets, plus why it exists and how big it is."""

    name: str  # unique within a scale, e.g. E1-dct_attn-s0
    experiment: str  # E1..E8
    group: str  # the configuration, compared across seeds (e.g. "dct_attn")
    task: str
    preset: str
    layout: str
    sets: tuple[str, ...]  # --set overrides, in order
    seed: int
    family: str  # model family for the time estimate (tokens/s differ by family)
    train_tokens: int  # estimated training tokens (for the estimate)
    eval_tokens: int  # estimated evaluation tokens (validation passes and the one test pass)
    prepare: str = ""  # a data-preparation step the run needs first (run.PREPARE)

    def all_sets(self) -> list[str]:
        return [*self.sets, f"train.seed={self.seed}"]


@dataclass(frozen=True)
class Analysis:
    """A step computed from finished runs (no training)."""

    name: str
    experiment: str
    needs: tuple[str, ...]  # run names it reads
    seed: int


@dataclass
class Matrix:
    scale: str
    runs: list[RunSpec]
    analyses: list[Analysis]
    notes: dict[str, list[str]] = field(default_factory=dict)  # experiment -> reductions and their reasons


# --------------------------------------------------------------------------- per-scale settings
SMOKE_MODEL = ("model.d_model=32", "model.n_heads=2")


@dataclass(frozen=True)
class LMBudget:
    task_sets: tuple[str, ...]  # shared by every LM run of the scale (the batch size comes from below)
    epochs: float  # passes over the main corpus's training split (E1, E3, E4, E6; E2 takes E1's token count)
    train_tokens_wt2: int  # tokens in one epoch of that split (for estimates and equal budgets)
    batch: int  # sequences per step
    seq_len: int


LM = {
    # smoke: byte tokens and d 32 keep every run to seconds (the GPT-2 embedding alone would dominate)
    "smoke": LMBudget(("data.tokenizer=bytes", *SMOKE_MODEL, "data.seq_len=32",
                       "train.warmup_steps=1", "train.log_every=1", "train.eval_every=2", "train.ckpt_every=1",
                       "train.eval_batch_size=64",
                       "train.lr=3e-3", "train.device=cpu", "train.max_steps=2"),
                      1.0, 0, 4, 32),
    "cpu": LMBudget(("train.lr=5e-4", "train.min_lr=1e-5", "train.warmup_steps=40", "train.log_every=5",
                     "train.device=cpu"),
                    4.0, 225_000, 16, 256),
    "paper": LMBudget((), 10.0, 2_400_000, 128, 256),
}
# Training tokens per epoch of the full corpora (GPT-2 BPE, SPEC §2); the proxies use LMBudget's figure.
PAPER_EPOCH_TOKENS = {"wikitext103": 122_000_000}
# Evaluation tokens per LM run: every validation pass (10 periodic, 1 final) plus the test pass.
VAL_PASSES = 11
WT2_EVAL = VAL_PASSES * 25_000 + 286_000
E2_SUBSET = {"smoke": (40, 8, 8), "cpu": (5000, 400, 1000), "paper": (0, 0, 0)}  # train/val/test reviews
REVIEW_TOKENS = 300  # GPT-2 tokens per IMDB review (E2's 400 validation reviews: 120,576)

# E6's mixture per scale (--set overrides, data preparation). Published: WikiText-2, IMDB and LRA
# ListOps beside WikiText-103, with probability 0.25 per step; cpu and smoke: see CPU_NOTES["E6"].
_IMDB_TEXT = ("data.train_files=[{data}/train.txt]", "data.val_files=[{data}/val.txt]", "data.test_files=[{data}/test.txt]")
MIX_SETS = {
    "smoke": (("mix.tasks=[text,imdb,listops-flat]", "mix.prob=1.0", "mix.seq_len=32", *_IMDB_TEXT), "imdb-text"),
    "cpu": (("mix.tasks=[text,imdb,listops-flat]", "mix.prob=0.25", *_IMDB_TEXT), "imdb-text"),
    "paper": (("mix.tasks=[wikitext2,imdb,listops]", "mix.prob=0.25"), ""),
}
# For the estimates: extra training tokens per main token, 0.25 x the mean over the aux tasks of
# their batch's tokens relative to the main batch's (aux batches have the main batch's size: aux LM 1,
# IMDB 256 / 256 tokens per sequence = 1, flat ListOps ~0.04), and the aux LM's test tokens.
MIX_EXTRA = (0.17, 290_000)

CPU_NOTES = {
    "all": [
        "paper-17m architecture (4 layers, d 256, 4 heads, FFN 1024, GPT-2 BPE, context 256, dropout 0.1) "
        "wherever a claim is about it; routed layers 2-3 as published (D, DA, DA, A).",
        "16 sequences per step instead of 128 and lr 5e-4 instead of 1e-4 (warm-up 40 steps, capped at "
        "a tenth of the run: 22 of 220; cosine to 1e-5): "
        "~0.9M training tokens per run fit 2 CPU cores (~1,100-1,400 tokens/s); at the published lr and "
        "batch a run this short barely leaves the unigram solution, and at lr 1e-3 the E2 baseline (seed 0) "
        "stayed on it for all 220 steps (post-LN; test PPL above the unigram's) while 5e-4 left it by step 88. "
        "Differences that need long training (the published 10 epochs of WikiText-103, ~1.2B tokens) may not "
        "show or may reverse.",
        "Every run on the WikiText-2 proxy (E1, E3, E4, E6) takes E1's budget: 4 epochs (~0.9M tokens, 220 "
        "steps of 16). At half of it (2 epochs at 8 per step), the seed-0 soft, hard and threshold E3 runs ended "
        "at 0.50-0.51 of the unigram PPL (test), on the report's 'clearly learned' bar, and E4's quantile-0.25 "
        "run at the same validation PPL (1,253); at 110 steps of 16, E3-soft reached only 0.66. Those runs were "
        "discarded.",
        "dct_attn routes with threshold routing at the default tau (the Gaussian-vector entropy at d, the "
        "published operating point); its achieved attention share is recorded, not fixed.",
    ],
    "E1": ["WikiText-2 proxy (SPEC §5): trained on WikiText-2 valid (first 90%), validated on its last 10%, "
           "tested on WikiText-2 test; the WikiText-2 train split is not on these machines. 4 epochs (~0.9M tokens)."],
    "E2": ["WikiText-103 is not here (and its published protocol is ~2 GPU-days); the direction is tested on "
           "IMDB review text at E1's token budget (~0.9M tokens, one pass, no repetition): 5,000 seeded-random "
           "train reviews, 400 validation reviews, 1,000 seeded-random test reviews (the full 25,000-review test "
           "split alone would take ~25 min per run to evaluate on CPU). Reviews are separated by a blank line. "
           "This shows whether less repetition and more varied text move the comparison at 17M-size, "
           "not what happens at 1.2B tokens."],
    "E3": ["4 routings x 3 seeds at E1's budget, so the PPLs stand beside E1's baseline and DCT+Attn runs."],
    "E4": ["Entropy routing at a fixed share uses routing=quantile (tau follows the "
           "(1 - share) quantile of earlier batches' entropies, see docs/routing.md); the control uses "
           "routing=random at the same share. Shares 0 and 1.0 are the layouts D,D,D,A and D,A,A,A."],
    "E5": ["IMDB: published encoding (GPT-2 BPE, first 256 tokens) at the published lr 5e-5 and batch 32, but "
           "250 steps (8,000 reviews drawn at random from the 22,500 of the train part, ~0.36 epoch) instead of "
           "4 epochs; test: all 25,000 reviews. (Not data.max_examples: the data files are sorted by label.)",
           "listops-flat: the published toy as defined (10,000 train expressions), published 4 epochs at 5e-5.",
           "LRA ListOps at CPU size: lengths 50-300 instead of 500-2000, depth 6, 8,000 training expressions, "
           "600 steps of 32 (LRA: 96,000 expressions, 5,000 steps); paper-17m width, bidirectional attention."],
    "E6": ["Gate-only runs (no mixing): dct_attn with the causal MetaRouter vs the published batch-mean gate "
           "(NON-CAUSAL: lets each position see the future and other sequences; run with allow_noncausal), "
           "E1's budget.",
           "Mixed runs (mixed-*): the same two gates and budget on the same main corpus (the WikiText-2 proxy), so "
           "with and without mixing differ only by the mixture: at every step, with probability 0.25 (published), "
           "one extra batch from an aux task drawn uniformly: IMDB review-text LM (E2's files: the naturalistic "
           "LM beside the main one), IMDB sentiment (published encoding, 256 GPT-2 tokens) and the flat ListOps "
           "toy (symbolic), each classification task with its own head (docs/training.md). Published: WikiText-103 "
           "main with WikiText-2, IMDB and LRA ListOps as aux tasks; WikiText-103 is not here and the WikiText-2 "
           "proxy is itself the main corpus, so the aux LM is the IMDB text and the test is on the main corpus "
           "(WikiText-2 test) and on the IMDB text test. LRA ListOps is left out (inputs of 500-2000 tokens would "
           "dominate a CPU step); the flat toy keeps a symbolic task. 220 steps with ~55 extra batches: the "
           "mixture's effect at this budget is small and may not show."],
    "E7": ["Analysis of E1's runs: the published calibration (33rd/67th percentiles of the trained baseline's "
           "token-embedding entropies, midpoint for two-operator layers) applied to the E1 dct_attn model, "
           "next to ours (the 75th percentile of each routed layer's own inputs); shares measured on 16 "
           "validation batches of 8."],
    "E8": ["`chiar flops` (analytic MACs, causal keys, DCT as executed) at each run's achieved test shares, "
           "plus each run's measured training tokens/s (the median over its logged windows; rough: "
           "it depends on the load of the machine)."],
}
SMOKE_NOTES = {"all": ["smoke scale: tiny dimensions (preset tiny), a few steps; numbers mean nothing."]}
PAPER_NOTES = {"all": ["the published protocol (SPEC §2); needs a GPU and the data (`chiar download`)."]}


def _lm_run(scale: str, experiment: str, group: str, layout: str, seed: int, *, task: str = "wikitext2-proxy",
            sets: tuple[str, ...] = (), family: str = "lm",
            prepare: str = "", max_steps: int = 0, extra: tuple[float, int] = (0.0, 0),
            eval_tokens: int = WT2_EVAL) -> RunSpec:
    """The scale's budget (b.epochs over the task's training split, or max_steps); extra: (training
    tokens added per main token, evaluation tokens added), e.g. a mixture's; eval_tokens: every
    validation pass plus the test pass, for the estimates."""
    b = LM[scale]
    preset = "tiny" if scale == "smoke" else "paper-17m"
    budget = []
    if scale != "smoke":
        budget = [f"train.max_steps={max_steps}"] if max_steps else [f"train.epochs={b.epochs}"]
    per_epoch = PAPER_EPOCH_TOKENS.get(task, b.train_tokens_wt2)
    tokens = (max_steps * b.batch * b.seq_len) if max_steps else int(b.epochs * per_epoch)
    if scale == "smoke":
        tokens = 2 * b.batch * b.seq_len
    eval_tokens = 0 if scale == "smoke" else eval_tokens + extra[1]
    batch_sets = () if scale == "paper" else (f"train.batch_size={b.batch}",)  # paper: the preset's 128
    return RunSpec(f"{experiment}-{group}-s{seed}", experiment, group, task, preset, layout,
                   (*batch_sets, *b.task_sets, *budget, *sets), seed, family, int(tokens * (1 + extra[0])),
                   eval_tokens, prepare)


def _cls_run(scale: str, experiment: str, group: str, task: str, layout: str, seed: int, sets: tuple[str, ...],
             tokens: int, eval_tokens: int) -> RunSpec:
    preset = "tiny" if scale == "smoke" else "paper-17m"
    return RunSpec(f"{experiment}-{group}-s{seed}", experiment, group, task, preset, layout,
                   ("train.device=cpu", *sets) if scale != "paper" else sets, seed, "cls", tokens, eval_tokens)


CLS_SETS = {
    # task -> (sets per scale, training tokens, evaluation tokens) for the estimates
    "imdb": {
        "smoke": (("data.tokenizer=bytes", *SMOKE_MODEL, "train.batch_size=4", "train.max_steps=2", "train.log_every=1",
                   "data.seq_len=32"), 256, 256),
        "cpu": (("train.max_steps=250", "train.log_every=10"), 8000 * 240, 27_500 * 240),
        "paper": ((), 4 * 22_500 * 240, 27_500 * 240),
    },
    "listops-flat": {
        "smoke": ((*SMOKE_MODEL, "data.listops_train=64", "data.listops_val=16", "data.listops_test=16", "train.batch_size=8",
                   "train.max_steps=2", "train.log_every=1"), 160, 320),
        "cpu": (("train.log_every=20",), 4 * 10_000 * 10, 2000 * 10),
        "paper": ((), 4 * 10_000 * 10, 2000 * 10),
    },
    "listops": {
        "smoke": ((*SMOKE_MODEL, "data.listops_train=32", "data.listops_val=8", "data.listops_test=8",
                   "data.listops_min_length=10", "data.listops_max_length=40", "data.listops_max_depth=3",
                   "data.seq_len=40", "train.batch_size=8", "train.max_steps=2", "train.log_every=1",
                   "data.workers=1"), 640, 640),
        "cpu": (("data.listops_train=8000", "data.listops_val=500", "data.listops_test=1000",
                 "data.listops_min_length=50", "data.listops_max_length=300", "data.listops_max_depth=6",
                 "data.seq_len=300", "train.max_steps=600", "train.log_every=20"), 600 * 32 * 175, 11 * 500 * 175),
        "paper": ((), 5000 * 32 * 1100, 11 * 2000 * 1100),
    },
}


def build_matrix(scale: str, seeds: int | None = None) -> Matrix:
    if scale not in SCALES:
        raise UserError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    n_seeds = DEFAULT_SEEDS[scale] if seeds is None else seeds
    if n_seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {n_seeds}")
    b = LM[scale]
    runs: list[RunSpec] = []
    analyses: list[Analysis] = []
    for s in range(n_seeds):
        # E1: the small corpus (paper scale: WikiText-2 train itself).
        e1_task = "wikitext2" if scale == "paper" else "wikitext2-proxy"
        for layout in ("baseline", "dct_attn"):
            runs.append(_lm_run(scale, "E1", layout, layout, s, task=e1_task))
        # E2: the larger naturalistic corpus at E1's token budget (paper: WikiText-103 itself).
        for layout in ("baseline", "dct_attn"):
            if scale == "paper":
                runs.append(_lm_run(scale, "E2", layout, layout, s, task="wikitext103"))
            else:
                e1_steps = 0 if scale == "smoke" else round(b.epochs * b.train_tokens_wt2 / (b.batch * b.seq_len))
                files = ("data.train_files=[{data}/train.txt]", "data.val_files=[{data}/val.txt]",
                         "data.test_files=[{data}/test.txt]")
                _, n_val, n_test = E2_SUBSET[scale]
                runs.append(_lm_run(scale, "E2", layout, layout, s, task="text", sets=files, max_steps=e1_steps,
                                    prepare="imdb-text", eval_tokens=(VAL_PASSES * n_val + n_test) * REVIEW_TOKENS))
        # E3: three operators with each routing mode, and the published regulariser.
        e3_task = "wikitext103" if scale == "paper" else "wikitext2-proxy"
        for group, sets in (("soft", ("model.routing=soft",)), ("hard", ("model.routing=hard",)),
                            ("threshold", ("model.routing=threshold",)),
                            ("threshold-reg", ("model.routing=threshold", "model.collapse_reg=0.01",
                                               "model.collapse_form=reference"))):
            runs.append(_lm_run(scale, "E3", group, "three_op", s, task=e3_task, sets=sets, family="lm-three_op"))
        # E4: entropy vs random routing at equal shares, and the share sweep.
        for share in (0.25, 0.5):
            for routing in ("quantile", "random"):
                runs.append(_lm_run(scale, "E4", f"{routing}-{share}", "dct_attn", s, task=e3_task,
                                    sets=(f"model.routing={routing}", f"model.attn_fraction={share}")))
        for group, layout in (("share-0", "D,D,D,A"), ("share-1", "D,A,A,A")):
            runs.append(_lm_run(scale, "E4", group, layout, s, task=e3_task))
        # E5: classification, baseline vs DCT+Attn.
        for task in ("imdb", "listops-flat", "listops"):
            sets, tokens, eval_tokens = CLS_SETS[task][scale]
            for layout in ("baseline", "dct_attn"):
                runs.append(_cls_run(scale, "E5", f"{task}-{layout}", task, layout, s, sets, tokens, eval_tokens))
        # E6: the MetaRouter gate, causal and the published batch mean, without and with mixing.
        mix_sets, mix_prepare = MIX_SETS[scale]
        for group, sets in (("gate-causal", ("model.meta_router=causal",)),
                            ("gate-batch_mean", ("model.meta_router=batch_mean", "model.allow_noncausal=true"))):
            runs.append(_lm_run(scale, "E6", group, "dct_attn", s, task=e3_task, sets=sets))
            runs.append(_lm_run(scale, "E6", f"mixed-{group}", "dct_attn", s, task=e3_task, sets=(*sets, *mix_sets),
                                prepare=mix_prepare, extra=MIX_EXTRA))
        # E7: analysis over E1's pair of runs of this seed.
        analyses.append(Analysis(f"E7-calibration-s{s}", "E7", (f"E1-baseline-s{s}", f"E1-dct_attn-s{s}"), s))
    # Experiment-major (all seeds of E1, then E2, ...): each experiment's comparison completes as
    # early as possible when the matrix spans several sessions.
    runs.sort(key=lambda r: r.experiment)
    notes = {"smoke": SMOKE_NOTES, "cpu": CPU_NOTES, "paper": PAPER_NOTES}[scale]
    return Matrix(scale, runs, analyses, notes)


def select(matrix: Matrix, only: str | None) -> Matrix:
    """Keep the experiments named in `only` ("E1,E3"); E7 keeps the E1 runs it reads."""
    if not only:
        return matrix
    wanted = {x.strip().upper() for x in only.split(",") if x.strip()}
    unknown = sorted(wanted - set(CLAIMS))
    if unknown:
        raise UserError(f"--only: unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(CLAIMS)}")
    analyses = [a for a in matrix.analyses if a.experiment in wanted]
    needed = {n for a in analyses for n in a.needs}
    runs = [r for r in matrix.runs if r.experiment in wanted or r.name in needed]
    return Matrix(matrix.scale, runs, analyses, matrix.notes)
