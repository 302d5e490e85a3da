"""`python -m quant`: see quant/cli.py."""

import sys

from .cli import main

sys.exit(main())
