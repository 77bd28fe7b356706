"""Test setup: the data folder of this repository's development machines, ../shared/data next to the
checkout, is the default CHIAR_DATA_DIR of the test suite (users set CHIAR_DATA_DIR or use
`chiar download`); tests that need their own folder set the variable themselves."""

import os
from pathlib import Path

_CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not os.environ.get("CHIAR_DATA_DIR") and _CHECKOUT_DATA.is_dir():
    os.environ["CHIAR_DATA_DIR"] = str(_CHECKOUT_DATA)
