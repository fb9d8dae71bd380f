"""``python -m recoder_dist``: the command line (see :mod:`recoder_dist.cli`)."""

import sys

from recoder_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
