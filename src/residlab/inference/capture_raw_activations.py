"""``python -m residlab.inference.capture_raw_activations`` (same flags as ``residlab capture``)."""

import sys

from residlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["capture", *sys.argv[1:]]))
