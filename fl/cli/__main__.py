"""``python -m fl.cli``: the ``fl`` command."""

import sys

from fl.cli import main

sys.exit(main())
