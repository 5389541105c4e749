"""Input pipeline: sources, MSF augmentations (TensorFlow, host CPU only) and batching.

The names a config chooses from live here, where reading them imports no TensorFlow."""

PAIRINGS = ('w/s', 'w/w', 's/s', 's/w')  # target view / online view: weak or strong
SOURCES = ('tfds', 'folder', 'digits')
# Who crops and resizes the two views: TensorFlow's ops (no GIL held: a TPU host's rate) or
# PIL itself (its exact pixels, more samples a core, but the GIL held a while each sample).
CROPS = ('tensorflow', 'pil')
