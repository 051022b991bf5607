"""``python -m rnan_fast``: the rnan-fast command line (rnan_fast.cli)."""
import sys

from rnan_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
