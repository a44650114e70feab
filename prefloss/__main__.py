"""``python -m prefloss ...`` == the ``prefloss`` command (e.g. under ``accelerate launch -m prefloss``)."""

import sys

from prefloss.cli import main

if __name__ == "__main__":
    sys.exit(main())
