"""``python -m vapt_kernels.bench``: the ``vapt-bench`` command."""

import sys

from .cli import main

sys.exit(main())
