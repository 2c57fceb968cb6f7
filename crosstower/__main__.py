"""``python -m crosstower`` is the ``crosstower`` command (so ``torchrun -m crosstower run CONFIG``
trains on several processes)."""

import sys

from crosstower.cli import main

sys.exit(main())
