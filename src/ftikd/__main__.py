"""``python -m ftikd``: the command line, e.g. ``torchrun --nproc_per_node 2 -m ftikd cache ...``."""

import sys

from ftikd.cli import main

sys.exit(main())
