"""``python -m flexsp.profile [key=value ...]`` = ``flexsp-profile``."""

import sys

from flexsp.profile import main

if __name__ == "__main__":
    sys.exit(main())
