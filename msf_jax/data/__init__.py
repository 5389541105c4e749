"""Input pipeline: sources, MSF augmentations (TensorFlow, host CPU only) and batching."""
