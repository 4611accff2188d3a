"""What learns: encoders and heads (encoders.py), the batch augmentations (augment.py), and the
self-supervised methods with their losses (ssl/)."""
