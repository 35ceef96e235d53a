"""``python -m residlab.analysis.model_diff.per_token_diff``

The seed's path; same flags as ``residlab diff per-token``."""

if __name__ == "__main__":
    from residlab.cli import run_module

    raise SystemExit(run_module("diff", "per-token"))
