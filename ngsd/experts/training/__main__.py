"""`python -m ngsd.experts.training`: the same as `ngsd train-expert`."""

import sys

from .cli import main

sys.exit(main())
