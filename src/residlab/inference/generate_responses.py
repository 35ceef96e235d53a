"""``python -m residlab.inference.generate_responses``

The seed's path; same flags as ``residlab responses``."""

if __name__ == "__main__":
    from residlab.cli import run_module

    raise SystemExit(run_module("responses"))
