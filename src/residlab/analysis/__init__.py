"""Analyses that read what the inference stages wrote (captures, projections, responses)."""
