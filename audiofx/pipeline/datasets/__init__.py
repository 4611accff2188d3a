"""Dataset adapters, one module per dataset; importing this package registers them all."""

# Imported for their register() side effect.
from audiofx.pipeline.datasets import (  # noqa: E402,F401
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
    get_adapter,
)

__all__ = ["AUDIO_EXTENSIONS", "REGISTRY", "Clip", "DatasetAdapter", "DatasetIndex", "get_adapter"]
