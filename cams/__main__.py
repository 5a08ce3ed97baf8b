"""``python -m cams <command>``: kept for existing scripts; a door onto pfcam's command line (``pfcam``), not a
layer of its own (cams does not depend on it)."""
import sys

from pfcam.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m cams"))
