"""``python -m residlab.analysis.model_diff.compare_variants``

The seed's path; same flags as ``residlab diff compare``."""

if __name__ == "__main__":
    from residlab.cli import run_module

    raise SystemExit(run_module("diff", "compare"))
