"""``python -m graphopt``: the ``graphopt`` command, for environments where the script is not on PATH."""

import sys

from graphopt.cli import main

sys.exit(main())
