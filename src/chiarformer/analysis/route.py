"""Per-token routing views: which operator each token took at each routed layer, and why (H).

Everything shown comes from one forward pass of the model itself (out.routing): the operator
ids are the model's own decisions and H is the spectral entropy its router saw. Nothing is
recomputed or re-thresholded here.

Three renderings of the same `RouteView`: ANSI-coloured terminal text, a self-contained HTML
page (tokens shaded by operator, hovering a token shows H and the operator at every layer),
and a matplotlib PNG.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..operators import ATTN, DCT, RBF, Op, layer_letters
from .common import OP_COLORS, Batch, forward_routing

# 256-colour ANSI backgrounds close to OP_COLORS (blue, orange, green), with readable text.
ANSI = {DCT: "\x1b[48;5;25m\x1b[97m", ATTN: "\x1b[48;5;208m\x1b[30m", RBF: "\x1b[48;5;71m\x1b[30m"}
RESET = "\x1b[0m"


@dataclass
class RouteView:
    tokens: list[str]  # display form of each token
    ids: list[int]
    layer_ops: list[tuple[int, ...]]  # operators each layer offers
    entropy: np.ndarray  # (n_layers, T) H seen by each layer's router (its input)
    ops: np.ndarray  # (n_layers, T) operator each token took
    taus: dict[int, tuple[float, ...]]  # routed layer -> thresholds (threshold routing), else {}
    routing: str
    truncated: int = 0  # tokens dropped beyond max_seq_len

    @property
    def routed(self) -> list[int]:
        return [i for i, ops in enumerate(self.layer_ops) if len(ops) > 1]

    def shown(self, all_layers: bool = False) -> list[int]:
        return list(range(len(self.layer_ops))) if all_layers or not self.routed else self.routed

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "ids": self.ids,
            "routing": self.routing,
            "layers": [
                {
                    "layer": i + 1,
                    "ops": layer_letters(self.layer_ops[i]),
                    "taus": list(self.taus.get(i, ())),
                    "entropy": [round(float(h), 6) for h in self.entropy[i]],
                    "op": [Op(int(o)).label for o in self.ops[i]],
                }
                for i in range(len(self.layer_ops))
            ],
        }


def display_token(text: str) -> str:
    """A visible form of a token: whitespace and control characters made explicit."""
    out = text.replace("\n", "\u23ce").replace("\t", "\u21e5").replace("\r", "")
    out = "".join(ch if ch.isprintable() else "\ufffd" for ch in out)
    return out if out else "\u2205"


def route_text(model, tokenizer, text: str) -> RouteView:
    """Run the model once on `text` and collect its routing decisions."""
    if tokenizer is None:
        raise UserError("this run has no tokenizer (its task uses a private vocabulary); it cannot read text")
    ids = list(tokenizer.encode(text))
    if not ids:
        raise UserError("the text has no tokens")
    cfg = model.cfg
    dropped = max(0, len(ids) - cfg.max_seq_len)
    ids = ids[: cfg.max_seq_len]
    out = forward_routing(model, Batch(torch.tensor([ids]), None))
    entropy = np.stack([info.entropy[0].float().cpu().numpy() for info in out.routing])
    ops = np.stack([info.ops[0].cpu().numpy() for info in out.routing]).astype(np.int64)
    taus = {i: cfg.layer_taus(i) for i in cfg.routed_layers} if cfg.routing == "threshold" else {}
    tokens = [display_token(tokenizer.decode([i])) for i in ids]
    return RouteView(tokens, ids, cfg.layer_ops, entropy, ops, taus, cfg.routing, dropped)


# --------------------------------------------------------------------------- terminal
def _layer_title(view: RouteView, i: int) -> str:
    letters = layer_letters(view.layer_ops[i])
    taus = view.taus.get(i)
    extra = f", tau {'/'.join(f'{t:.4f}' for t in taus)}" if taus else ""
    return f"layer {i + 1} ({letters}{extra})"


def _share_text(view: RouteView, i: int) -> str:
    """Layer i's operators with the share of tokens each took, e.g. "DCT 75%, attention 25%"."""
    return ", ".join(f"{Op(op).label} {100 * float(np.mean(view.ops[i] == op)):.0f}%" for op in view.layer_ops[i])


def render_ansi(view: RouteView, color: bool = True, all_layers: bool = False) -> str:
    def paint(text: str, op: int) -> str:
        return f"{ANSI[op]}{text}{RESET}" if color else f"[{text}]{Op(op).label[0]}"

    shown = view.shown(all_layers)
    present = sorted({int(o) for i in shown for o in view.ops[i]} | {op for i in shown for op in view.layer_ops[i]})
    lines = [
        f"{len(view.ids)} token(s); routing={view.routing}; layers shown: {', '.join(str(i + 1) for i in shown)}"
        + (f" (text truncated: {view.truncated} token(s) beyond max_seq_len dropped)" if view.truncated else ""),
        "legend: " + " ".join(paint(f" {Op(op).label} ", op) for op in present),
        "",
    ]
    width = max(len(_layer_title(view, i)) for i in shown)
    for i in shown:
        text = "".join(paint(tok, int(op)) for tok, op in zip(view.tokens, view.ops[i], strict=True))
        share = _share_text(view, i)
        lines.append(f"{_layer_title(view, i):<{width}}  [{share}]")
        lines.append(f"  {text}")
    lines.append("")
    tok_w = min(24, max(5, max(len(t) for t in view.tokens) + 2))
    header = f"{'#':>4}  {'token':<{tok_w}}" + "".join(f"  {'L' + str(i + 1) + ' H':>8} {'op':<4}" for i in shown)
    lines.append(header)
    for t, tok in enumerate(view.tokens):
        visible = tok.replace(" ", "\u2423")  # open box for spaces
        shown_tok = visible if len(visible) <= tok_w - 2 else visible[: tok_w - 5] + "..."
        row = f"{t:>4}  {shown_tok:<{tok_w}}"
        for i in shown:
            op = int(view.ops[i, t])
            label = f"{Op(op).label:<4}"
            row += f"  {view.entropy[i, t]:>8.4f} " + (paint(label, op) if color else label)
        lines.append(row)
    return "\n".join(lines)


# --------------------------------------------------------------------------- HTML
def render_html(view: RouteView, title: str = "CHIAR-Former routing", all_layers: bool = False) -> str:
    shown = view.shown(all_layers)
    css = "\n".join(
        [
            "body{font-family:system-ui,sans-serif;margin:2em;color:#222}",
            ".row{margin:0.6em 0 1.2em 0;line-height:2.1em}",
            ".tok{padding:0.15em 0.1em;margin:0 1px;border-radius:3px;white-space:pre;font-family:monospace;cursor:default}",
            ".tok:hover{outline:2px solid #222}",
            "table{border-collapse:collapse;font-family:monospace;font-size:0.9em}",
            "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}",
            "td.t{text-align:left}",
        ]
        + [f".op{op}{{background:{OP_COLORS[op]};color:{'#fff' if op == DCT else '#000'}}}" for op in OP_COLORS]
    )

    def tip(t: int) -> str:
        rows = [f"token {t}: {view.tokens[t]!r} (id {view.ids[t]})"]
        for i in range(len(view.layer_ops)):
            marker = " (routed)" if len(view.layer_ops[i]) > 1 else ""
            rows.append(f"layer {i + 1}{marker}: H={view.entropy[i, t]:.4f} -> {Op(int(view.ops[i, t])).label}")
        return html.escape("\n".join(rows), quote=True)

    tips = [tip(t) for t in range(len(view.ids))]
    body = [f"<h1>{html.escape(title)}</h1>"]
    body.append(
        "<p>Each row is one layer; every token is shaded by the operator <b>the model chose</b> for it there "
        "(from its own forward pass). Hover a token for its spectral entropy H and operator at every layer. "
        f"Routing: {html.escape(view.routing)}.</p>"
    )
    legend = " ".join(f'<span class="tok op{op}">{Op(op).label}</span>' for op in present_ops(view, shown))
    body.append(f"<p>Legend: {legend}</p>")
    if view.truncated:
        body.append(f"<p>The text was truncated: {view.truncated} token(s) beyond max_seq_len were dropped.</p>")
    for i in shown:
        share = _share_text(view, i)
        spans = "".join(
            f'<span class="tok op{int(view.ops[i, t])}" title="{tips[t]}">{html.escape(view.tokens[t])}</span>'
            for t in range(len(view.ids))
        )
        body.append(f"<h3>{html.escape(_layer_title(view, i))} &mdash; {share}</h3><div class=\"row\">{spans}</div>")
    head = "<tr><th>#</th><th>token</th>" + "".join(f"<th>L{i + 1} H</th><th>op</th>" for i in shown) + "</tr>"
    rows = []
    for t in range(len(view.ids)):
        cells = "".join(
            f"<td>{view.entropy[i, t]:.4f}</td><td class=\"op{int(view.ops[i, t])}\">{Op(int(view.ops[i, t])).label}</td>"
            for i in shown
        )
        rows.append(f"<tr><td>{t}</td><td class=\"t\">{html.escape(repr(view.tokens[t]))}</td>{cells}</tr>")
    body.append(f"<h2>Per token</h2><table>{head}{''.join(rows)}</table>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{css}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


# --------------------------------------------------------------------------- PNG
def tau_margin(view: RouteView, i: int) -> np.ndarray | None:
    """H - tau per token of layer i (the nearest tau in three-operator layers); None without a tau."""
    taus = view.taus.get(i)
    if not taus:
        return None
    gaps = view.entropy[i][None, :] - np.asarray(taus, dtype=np.float64)[:, None]  # (n_taus, T)
    return gaps[np.abs(gaps).argmin(axis=0), np.arange(gaps.shape[1])]


def present_ops(view: RouteView, layers: list[int]) -> list[int]:
    """Operators some token took in the given layers, in the order DCT, attention, RBF."""
    taken = {int(o) for i in layers for o in view.ops[i]}
    return [op for op in (DCT, ATTN, RBF) if op in taken]


def route_figure(view: RouteView, all_layers: bool = False, title: str | None = None):
    """Two panels over the tokens: the operator each took per layer (legend: operators present), and
    the spectral entropy H on a colour scale with, in each cell, the margin H - tau (or H itself
    when the routing has no tau)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    shown = view.shown(all_layers)
    n = len(view.ids)
    fig_w = min(40.0, max(6.0, 0.32 * n + 3.0))
    row_h = 0.55 * len(shown) + 0.6
    fig, (ax_op, ax_h) = plt.subplots(2, 1, figsize=(fig_w, 2 * row_h + 1.6), sharex=True)
    cmap = ListedColormap([OP_COLORS[DCT], OP_COLORS[ATTN], OP_COLORS[RBF]])
    ax_op.imshow(view.ops[shown], cmap=cmap, vmin=-0.5, vmax=2.5, aspect="auto", interpolation="nearest")
    ax_op.legend(handles=[Patch(color=OP_COLORS[op], label=Op(op).label) for op in present_ops(view, shown)],
                 loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax_op.set_title(title or "operator per token", fontsize=9)
    entropy = view.entropy[shown]
    im = ax_h.imshow(entropy, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=[ax_op, ax_h], label="spectral entropy H", fraction=0.03, pad=0.12)
    margins = {i: tau_margin(view, i) for i in shown}
    if n <= 80:
        lo, hi = float(entropy.min()), float(entropy.max())
        for r, i in enumerate(shown):
            for t in range(n):
                value = margins[i][t] if margins[i] is not None else view.entropy[i, t]
                text = f"{value:+.3f}".replace("0.", ".", 1) if margins[i] is not None else f"{value:.2f}"
                light = hi > lo and (view.entropy[i, t] - lo) / (hi - lo) > 0.6  # viridis is light at the top
                ax_h.text(t, r, text, ha="center", va="center", fontsize=5.5, color="black" if light else "white")
    what = "cell text: H - tau (above 0: attention side)" if any(m is not None for m in margins.values()) else \
        f"cell text: H ({view.routing} routing has no tau)"
    ax_h.set_title(f"spectral entropy H seen by the router; {what}", fontsize=9)
    for ax in (ax_op, ax_h):
        ax.set_yticks(range(len(shown)), [_layer_title(view, i) for i in shown], fontsize=8)
    if n <= 200:
        ax_h.set_xticks(range(n), [t if len(t) <= 12 else t[:11] + "\u2026" for t in view.tokens], rotation=90, fontsize=7)
    else:
        ax_h.set_xlabel("token position")
    return fig


def render_png(view: RouteView, path: str | Path, all_layers: bool = False, title: str | None = None) -> Path:
    import matplotlib.pyplot as plt

    fig = route_figure(view, all_layers, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
