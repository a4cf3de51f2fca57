"""Calibration data and block-input capture."""
