"""``python -m sgl_budget.cli``: the ``sgl-budget`` command."""

import sys

from . import main

sys.exit(main())
