"""Evaluation of frozen encoders: features and kNN."""
