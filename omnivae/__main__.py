"""`python -m omnivae`: the command line as a module, for torchrun and environments without the script."""
import sys

from .cli import main

sys.exit(main())
