"""python -m lbd: the same as the lbd command."""

import sys

from lbd.cli import main

sys.exit(main())
