"""Self-supervised methods, one module each, registered here by name (after solo-learn's
layout): base.py (what a method is and declares), npid.py, simclr.py, moco.py, and their
losses (losses.py: SimCLR NT-Xent, NPID memory bank + NCE / softmax, MoCo v2 queue + InfoNCE +
momentum update). A new method is one new module and one entry below."""

from __future__ import annotations

from audiofx.training.models.ssl.base import Method, MethodOption
from audiofx.training.models.ssl.moco import MoCo
from audiofx.training.models.ssl.npid import NPID
from audiofx.training.models.ssl.simclr import SimCLR

METHODS: dict[str, type[Method]] = {m.name: m for m in (NPID, SimCLR, MoCo)}


def method_options() -> list[tuple[type[Method], MethodOption]]:
    """Every method's options with the method that owns each, in registry order."""
    return [(m, o) for m in METHODS.values() for o in m.options]
