"""``python -m pfcam``: the same as the ``pfcam`` command."""
import sys

from pfcam.cli import main

if __name__ == "__main__":
    sys.exit(main())
