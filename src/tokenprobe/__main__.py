"""``python -m tokenprobe``: the command line."""

import sys

from tokenprobe.cli import main

sys.exit(main())
