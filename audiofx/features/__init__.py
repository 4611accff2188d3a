"""Signal math only, no file I/O: batched torch log-mel features, resizing, presets."""
