"""`python -m agg_cli --help` (run from the pack's folder, or with it on PYTHONPATH)."""

import sys

from agg_cli.main import main

sys.exit(main())
