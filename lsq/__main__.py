"""``python -m lsq``: see lsq/cli.py."""

import sys

from lsq.cli import main

sys.exit(main())
