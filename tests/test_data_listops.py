"""ListOps: LRA generation rules checked by an independent evaluator, TSV files, tokenisations."""

import numpy as np
import pytest

from chiarformer.data import (
    ListOpsTokenizer,
    generate_listops,
    generate_listops_flat,
    load_task,
    read_listops_tsv,
    write_listops_tsv,
)
from chiarformer.data.listops import apply_operator
from chiarformer.errors import UserError

CPU = {"min_length": 50, "max_length": 250, "max_depth": 6, "max_args": 10}


def evaluate(source: str):
    """Independent reading of an LRA source: (value, length, max op depth, max digit depth, arg counts, tree)."""
    stack = [[None, []]]  # frames: [operator, arguments]; the bottom frame holds the root
    length = op_depth = digit_depth = 0
    arg_counts = []
    for token in source.split():
        if token in ("(", ")"):
            continue
        if token.startswith("["):
            stack.append([token[1:], []])
            length += 2
            op_depth = max(op_depth, len(stack) - 1)
        elif token == "]":
            op, args = stack.pop()
            arg_counts.append(len(args))
            values = sorted(v for v, _ in args)
            if op == "MIN":
                value = values[0]
            elif op == "MAX":
                value = values[-1]
            elif op == "SM":
                value = sum(values) % 10
            else:  # MED: median, mean of the two middle values for even counts, then int()
                mid = len(values) // 2
                value = int(values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2)
            stack[-1][1].append((value, (op, [t for _, t in args])))
        else:
            stack[-1][1].append((int(token), int(token)))
            length += 1
            digit_depth = max(digit_depth, len(stack))
    (value, tree), = stack[0][1]
    return value, length, op_depth, digit_depth, arg_counts, tree


def render(tree) -> str:
    """LRA's printing: (op, a1), then ((...), a_i) per further argument, then ((...), "]")."""
    if isinstance(tree, int):
        return str(tree)
    op, args = tree
    text = f"( [{op} {render(args[0])} )"
    for arg in args[1:]:
        text = f"( {text} {render(arg)} )"
    return f"( {text} ] )"


@pytest.mark.parametrize("rules", [CPU, {"min_length": 500, "max_length": 2000, "max_depth": 10, "max_args": 10}])
def test_generated_trees_follow_the_lra_rules(rules):
    n = 300 if rules is CPU else 20
    rows = generate_listops(n, seed=1, workers=1, **rules)
    assert len(rows) == n and len({s for s, _ in rows}) == n  # distinct
    ops_seen, args_seen = set(), set()
    for source, target in rows:
        value, length, op_depth, digit_depth, arg_counts, tree = evaluate(source)
        assert value == target
        assert rules["min_length"] < length < rules["max_length"]
        assert op_depth <= rules["max_depth"] - 1 and digit_depth <= rules["max_depth"]
        assert all(2 <= k <= rules["max_args"] for k in arg_counts)
        assert render(tree) == source
        ops_seen |= {t for t in source.split() if t.startswith("[")}
        args_seen |= set(arg_counts)
    if rules is CPU:
        assert ops_seen == {"[MIN", "[MAX", "[MED", "[SM"} and args_seen == set(range(2, 11))


def test_med_rule():
    assert apply_operator("MED", [1, 2, 3, 4]) == 2  # mean 2.5 -> 2
    assert apply_operator("MED", [9, 8]) == 8  # mean 8.5 -> 8
    assert apply_operator("MED", [3, 1, 2]) == 2
    assert apply_operator("SM", [9, 9, 3]) == 1 and apply_operator("MIN", [4, 2]) == 2


def test_seeded_and_independent_of_workers():
    one = generate_listops(600, seed=5, workers=1, **CPU)
    two = generate_listops(600, seed=5, workers=2, **CPU)
    assert one == two
    assert generate_listops(600, seed=6, workers=1, **CPU) != one


def test_impossible_settings_are_user_errors():
    with pytest.raises(UserError, match="holds no length"):
        generate_listops(10, min_length=100, max_length=101)
    with pytest.raises(UserError, match="longer than"):
        generate_listops(10, min_length=500, max_length=2000, max_depth=3)
    with pytest.raises(UserError):
        generate_listops(0)


def test_tsv_round_trip_and_bad_files(tmp_path):
    rows = generate_listops(50, seed=2, workers=1, **CPU)
    path = tmp_path / "basic_train.tsv"
    write_listops_tsv(path, rows)
    assert path.read_text().startswith("Source\tTarget\n( ")
    assert read_listops_tsv(path) == rows
    (tmp_path / "bad.tsv").write_text("src\ttgt\n1\t1\n")
    with pytest.raises(UserError, match="header"):
        read_listops_tsv(tmp_path / "bad.tsv")
    (tmp_path / "bad.tsv").write_bytes(b"Source\tTarget\n\xff\t1\n")
    with pytest.raises(UserError, match="not UTF-8"):
        read_listops_tsv(tmp_path / "bad.tsv")
    (tmp_path / "bad.tsv").write_text("Source\tTarget\n[MAX 1 ]\t12\n")
    with pytest.raises(UserError, match="line 2"):
        read_listops_tsv(tmp_path / "bad.tsv")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_listops_tsv(tmp_path / "empty.tsv")


def test_tokenisations():
    source = "( ( ( [MAX 2 ) ( ( ( [SM 3 ) 4 ) ] ) ) ] )"
    lra, brackets = ListOpsTokenizer("lra"), ListOpsTokenizer("brackets")
    assert lra.decode(lra.encode(source)) == "MAX 2 SM 3 4"
    assert brackets.decode(brackets.encode(source)) == "[MAX 2 [SM 3 4 ] ]"
    assert lra.vocab_size == brackets.vocab_size and 0 not in lra.encode(source)
    for src, _ in generate_listops(20, seed=0, workers=1, **CPU):
        assert len(brackets.encode(src)) == evaluate(src)[1]  # bracket tokens = the LRA length
    with pytest.raises(UserError, match="unknown ListOps token"):
        lra.encode("[POW 2 ]")
    with pytest.raises(UserError):
        ListOpsTokenizer("words")


def test_flat_variant_disjoint_and_correct():
    rows = generate_listops_flat(3000, seed=0)
    assert len({s for s, _ in rows}) == 3000
    for source, target in rows[:500]:
        op, *digits, end = source.split()
        digits = [int(d) for d in digits]
        assert end == "]" and 4 <= len(digits) <= 8 and len(source.split()) <= 12
        expected = {"[MAX": max(digits), "[MIN": min(digits),
                    "[MEAN": int(np.mean(digits)) % 10, "[MED": int(np.median(digits)) % 10}[op]
        assert target == expected
    task = load_task("listops-flat", listops_train=500, listops_val=50, listops_test=50)
    decode = task.tokenizer.decode
    train = {decode(task.train.example(i)) for i in range(len(task.train))}
    test = {decode(task.test.example(i)) for i in range(len(task.test))}
    assert not train & test and task.n_classes == 10


def test_listops_task_generates_once_and_reads_lra_files(tmp_path, monkeypatch):
    sizes = {"listops_train": 300, "listops_val": 20, "listops_test": 20, **{f"listops_{k}": v for k, v in CPU.items()}}
    task = load_task("listops", cache_dir=tmp_path, listops_tokens="brackets", workers=1, **sizes)
    assert (len(task.train), len(task.val), len(task.test)) == (300, 20, 20)
    assert task.seq_len == 250 and task.protocol["generation"]["max_depth"] == 6

    def no_generation(*a, **k):
        raise AssertionError("regenerated")

    monkeypatch.setattr("chiarformer.data.tasks.generate_listops", no_generation)
    again = load_task("listops", cache_dir=tmp_path, listops_tokens="brackets", workers=1, **sizes)
    assert np.array_equal(again.test.labels, task.test.labels)
    # The cached TSV files are LRA release files: load them back through path=.
    folder = tmp_path / "lra"
    folder.mkdir()
    for split in ("train", "val", "test"):
        (folder / f"basic_{split}.tsv").write_text(open(task.protocol["splits"][split]).read())
    from_files = load_task("listops", cache_dir=tmp_path, path=folder, listops_tokens="brackets", seq_len=250)
    assert np.array_equal(from_files.train.tokens, task.train.tokens)
    with pytest.raises(UserError, match="not found"):
        load_task("listops", cache_dir=tmp_path, path=tmp_path / "missing")
