"""Validation: equality against the eager PyTorch reference, and fidelity against an uncompressed model."""
