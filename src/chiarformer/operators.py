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

# Low spectral entropy (smooth vectors) to high: the order routers assign operators in.
ENTROPY_ORDER = (Op.DCT, Op.RBF, Op.ATTN)
# The members under short names, for call sites that compare operator ids.
DCT, ATTN, RBF = Op.DCT, Op.ATTN, Op.RBF


def layer_letters(ops) -> str:
    """The layout letters of one layer's operators in entropy order, e.g. (0, 1, 2) -> "DRA"."""
    return "".join(op.letter for op in ENTROPY_ORDER if op in ops)
