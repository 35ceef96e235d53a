"""``python -m residlab.inference.project_raw_activations_onto_traits`` (= ``residlab project``)."""

import sys

from residlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["project", *sys.argv[1:]]))
