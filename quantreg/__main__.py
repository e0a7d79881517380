"""``python -m quantreg``: the same command line as ``quantreg``."""

import sys

from quantreg.cli import main

sys.exit(main())
