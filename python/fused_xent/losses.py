"""Keras losses on the fused op (being written)."""
