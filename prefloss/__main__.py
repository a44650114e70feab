"""``python -m prefloss ...`` == the ``prefloss`` command (e.g. under ``accelerate launch -m prefloss``)."""

import sys

from prefloss.commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
