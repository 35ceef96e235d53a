"""The residual noising runner: generate, covariance (one module per pipeline stage)."""
