"""Routing-collapse detection from the per-layer operator shares logged during training.

metrics.jsonl train records carry ``op_share``: one ``[dct, attn, rbf]`` triple per layer (the
share of that layer's tokens each operator took over the logging interval). A routed layer has
*collapsed* onto fewer operators when one of its operators stays under ``threshold`` (1%) in
every train record of the last ``window`` (20%) of training, measured in steps.

Only operators the layer actually offers are checked (a "DA" layer never uses RBF; that is not
a collapse), and only routed layers (a single-operator layer has nothing to collapse).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..operators import Op


@dataclass(frozen=True)
class Collapse:
    layer: int  # 0-based layer index
    op: int  # operator id (0 = DCT, 1 = attention, 2 = RBF)
    max_share: float  # largest share the operator reached inside the window
    mean_share: float  # its mean share inside the window
    n_records: int  # train records inside the window
    from_step: int  # first step of the window

    @property
    def op_name(self) -> str:
        return Op(self.op).key

    def describe(self) -> str:
        return (
            f"layer {self.layer + 1}: {self.op_name} stayed under the threshold over the last "
            f"{self.n_records} logged step(s) from step {self.from_step} (max {100 * self.max_share:.2f}%, "
            f"mean {100 * self.mean_share:.2f}%)"
        )


def train_records(records: list[dict]) -> list[dict]:
    """Train records that carry op_share, in step order."""
    rows = [r for r in records if r.get("kind") == "train" and r.get("op_share") is not None]
    return sorted(rows, key=lambda r: r.get("step", 0))


def tail_window(rows: list[dict], window: float = 0.2) -> list[dict]:
    """The train records in the last `window` fraction of training (by step; at least one record)."""
    if not rows:
        return []
    first, last = rows[0].get("step", 0), rows[-1].get("step", 0)
    start = last - window * (last - first)
    tail = [r for r in rows if r.get("step", 0) >= start]
    return tail or rows[-1:]


def detect_collapse(
    records: list[dict],
    layer_ops: list[tuple[int, ...]] | None = None,
    threshold: float = 0.01,
    window: float = 0.2,
) -> list[Collapse]:
    """Operators of routed layers whose share stays below `threshold` over the last `window` of training.

    layer_ops: per layer, the operator ids it offers (ChiarConfig.layer_ops). Without it a layer
    counts as routed when it logged a non-zero share for two or more operators anywhere, and the
    operators it offers are taken to be those it ever used.
    """
    rows = train_records(records)
    if not rows:
        return []
    tail = tail_window(rows, window)
    n_layers = len(rows[-1]["op_share"])
    found = []
    for layer in range(n_layers):
        if layer_ops is not None:
            offered = tuple(layer_ops[layer]) if layer < len(layer_ops) else ()
        else:
            offered = tuple(
                op for op in Op if any(_share(r, layer, op) > 0 for r in rows)
            )
        if len(offered) < 2:
            continue
        for op in offered:
            shares = [_share(r, layer, op) for r in tail]
            if max(shares) < threshold:
                found.append(
                    Collapse(layer, op, max(shares), sum(shares) / len(shares), len(tail), int(tail[0].get("step", 0)))
                )
    return found


def _share(record: dict, layer: int, op: int) -> float:
    shares = record["op_share"]
    if layer >= len(shares) or shares[layer] is None or op >= len(shares[layer]):
        return 0.0
    value = shares[layer][op]
    return 0.0 if value is None else float(value)
