"""Routing analysis: tau calibration, per-token routing views, run reports, collapse detection.

- `calibrate`: set entropy thresholds from data (`chiar calibrate`).
- `route`: the operator each token took at each layer, as text, HTML or PNG (`chiar route`).
- `report`: markdown table and figures for runs (`chiar report`).
- `collapse`: flag operators that routed layers stopped using.
- `cli.register(subparsers)`: adds calibrate, route, flops and report to `chiar`.
The analytic FLOP accounting lives in `chiarformer.flops` (`chiar flops`).
"""

from .collapse import Collapse, detect_collapse

__all__ = ["Collapse", "detect_collapse"]
