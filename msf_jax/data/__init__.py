"""Input pipeline: sources, MSF augmentations (TensorFlow, host CPU only) and batching.

The names a config chooses from live here, where reading them imports no TensorFlow."""

PAIRINGS = ('w/s', 'w/w', 's/s', 's/w')  # target view / online view: weak or strong
SOURCES = ('tfds', 'folder', 'digits')
