"""`python -m preftune ...` (and `accelerate launch -m preftune ...`) runs the CLI."""

import sys

from preftune.cli import main

sys.exit(main())
