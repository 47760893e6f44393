"""Training loop, checkpoints and run folders, feature extraction."""
