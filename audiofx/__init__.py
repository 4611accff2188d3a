"""audiofx: a preprocessing-first pipeline with a cached, shareable feature store for sound classification."""

__version__ = "0.1.0"
