"""``python -m residlab.inference.project_raw_activations_onto_traits``

The seed's path; same flags as ``residlab project``."""

if __name__ == "__main__":
    from residlab.cli import run_module

    raise SystemExit(run_module("project"))
