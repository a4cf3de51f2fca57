"""Learnable Equivalent Transformation (LET): per-channel scales/shifts moved into weights."""
