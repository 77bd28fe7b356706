"""The token operators, defined once: id, layout letter, name, label, and entropy order.

The id is what RoutingInfo.ops holds and what indexes per-operator statistics (op_share
rows); the name keys the per-operator LayerNorms in checkpoints ("dct", "attention", "rbf").
Layouts are typed and printed in entropy order, the order a router assigns them from low to
high spectral entropy: DCT < RBF < attention, so a three-operator layer reads "DRA" both ways.
"""

from __future__ import annotations

from enum import IntEnum


class Op(IntEnum):
    DCT = 0
    ATTN = 1
    RBF = 2

    @property
    def letter(self) -> str:
        return _LETTERS[self]

    @property
    def key(self) -> str:
        """The name used in checkpoint keys and JSON records."""
        return _KEYS[self]

    @property
    def label(self) -> str:
        """The name printed in tables and legends."""
        return self.name

    @classmethod
    def from_letter(cls, letter: str) -> Op:
        return _BY_LETTER[letter]


_LETTERS = {Op.DCT: "D", Op.ATTN: "A", Op.RBF: "R"}
_KEYS = {Op.DCT: "dct", Op.ATTN: "attention", Op.RBF: "rbf"}
_BY_LETTER = {letter: op for op, letter in _LETTERS.items()}
LETTERS = "".join(_LETTERS.values())
N_OPS = len(Op)

# The ids as plain ints, for the model and its tensors (layer_ops, RoutingInfo.ops):
# torch.compile(fullgraph=True) cannot compare a tensor with an enum member.
DCT, ATTN, RBF = (int(op) for op in Op)
# Low spectral entropy (smooth vectors) to high: the order routers assign operators in.
ENTROPY_ORDER = (DCT, RBF, ATTN)


def layer_letters(ops) -> str:
    """The layout letters of one layer's operators in entropy order, e.g. (0, 1, 2) -> "DRA"."""
    return "".join(Op(op).letter for op in ENTROPY_ORDER if op in ops)
