"""`python -m chiarformer ...`: the `chiar` command line."""

import sys

from .cli import main

sys.exit(main())
