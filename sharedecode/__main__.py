"""`python -m sharedecode ...`: the same as the `sharedecode` console script."""

import sys

from sharedecode.cli import main

if __name__ == "__main__":
    sys.exit(main())
