"""`python -m vtprune ...`, as `accelerate launch -m vtprune eval ...` runs it."""

import sys

from .cli import main

sys.exit(main())
