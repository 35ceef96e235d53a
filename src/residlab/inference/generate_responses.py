"""``python -m residlab.inference.generate_responses`` (same flags as ``residlab responses``)."""

import sys

from residlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["responses", *sys.argv[1:]]))
