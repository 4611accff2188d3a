"""Where a run runs: the device and mixed precision (device.py), torchrun ranks (distributed.py)."""
