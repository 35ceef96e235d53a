"""``python -m residlab.inference.capture_raw_activations``

The seed's path; same flags as ``residlab capture``."""

if __name__ == "__main__":
    from residlab.cli import run_module

    raise SystemExit(run_module("capture"))
