"""Trait vectors: contrastive data, extraction, steering evaluation, selection."""
