"""Dataset adapters, one module per dataset; importing this package registers them all, and
``get_adapter`` looks one up by name."""

from audiofx.errors import ConfigError

# Imported for their register() side effect.
from audiofx.pipeline.datasets import (  # noqa: F401
    dcase2013,
    demo,
    esc50,
    folder,
    fsd50k,
    gtzan,
    tut,
    urbansound8k,
)
from audiofx.pipeline.datasets.base import (
    AUDIO_EXTENSIONS,
    REGISTRY,
    Clip,
    DatasetAdapter,
    DatasetIndex,
)

__all__ = ["AUDIO_EXTENSIONS", "REGISTRY", "Clip", "DatasetAdapter", "DatasetIndex", "get_adapter"]


def get_adapter(name: str) -> DatasetAdapter:
    if name not in REGISTRY:
        raise ConfigError(f"unknown dataset {name!r}", f"known datasets: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
