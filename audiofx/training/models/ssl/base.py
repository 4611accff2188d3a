"""What every self-supervised method is: a module that owns its encoder, heads and state
(memory bank, queue, momentum encoder), turns a batch of standardised features into a loss
(labels are never seen), and declares its own options, defaults and checks.

A method's options (``MethodOption``) are what ``audiofx pretrain`` offers for it (--nce-k for
NPID, --bn-splits for MoCo), keywords of its constructor and keys of a run's config.json. The
pretrain driver knows no method by name: it reads these declarations (stages/pretrain.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from audiofx.training.models.encoders import Encoder

Views = Callable[[torch.Tensor], torch.Tensor]  # one random augmentation of a batch

_SAME = object()


@dataclass(frozen=True)
class MethodOption:
    """One option of one method. Names are unique over all methods (each is a config.json key)."""

    name: str  # constructor keyword and config.json key; the flag is --name-with-dashes
    type: type  # int or float
    default: Any  # when not given; None: the method's ``resolve`` picks the value
    help: str
    what: str  # what it is, for the line that refuses it for another method ("its BatchNorm groups")
    minimum: float | None = None
    maximum: float | None = None
    before: Any = _SAME  # the value runs recorded before the option existed ran with (default: default)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def recorded_before(self) -> Any:
        return self.default if self.before is _SAME else self.before


class Method(nn.Module):
    name = ""
    title = ""  # as the papers write it
    # (lr, weight decay) for SGD with momentum 0.9 and a cosine schedule
    default_lr = 0.03
    default_weight_decay = 5e-4
    # Trains on two random views of each clip: with every augmentation off the positive would
    # be the clip itself, trivially the closest, and nothing would be learned.
    contrasts_views = True
    options: tuple[MethodOption, ...] = ()

    def __init__(self, encoder: Encoder, n_data: int, generator: torch.Generator):
        super().__init__()
        self.encoder = encoder

    @classmethod
    def resolve(cls, options: dict[str, Any], batch_size: int, recorded: dict[str, Any] | None) -> dict[str, Any]:
        """The values a run uses (and records) for its options as given (``None``: left to the
        method); ``recorded``: the config.json of the run a --resume continues."""
        return options

    @classmethod
    def notes(cls, options: dict[str, Any], samples: int) -> list[str]:
        """What a run with these options on a pool of ``samples`` should be told."""
        return []

    def loss(self, x: torch.Tensor, index: torch.Tensor, view: Views, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    @property
    def projection(self) -> nn.Module:
        """The head from the encoder's features to the space the loss compares (NPID's memory
        bank space, SimCLR's and MoCo's projection): where the papers' kNN looks."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, index: torch.Tensor, view: Views, generator: torch.Generator) -> torch.Tensor:
        # forward is the loss, so DistributedDataParallel can wrap a method as it is.
        return self.loss(x, index, view, generator)

    def after_step(self) -> None:
        """Called after the optimizer step (memory banks, queues and momentum encoders update here)."""


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (equal shapes), concatenated in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
