"""What the training stages' epoch loops share (fine-tuning, pretraining): one epoch's pass
with its order and augmentation seed, the progress bar, the optimiser step and the mean
loss; and the optimiser state a checkpoint keeps for a resume."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from audiofx.errors import TrainingError


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The augmentation generator's seed for one epoch. Of (seed, epoch), so that a resumed run
    draws the masks, shifts, mixup partners and NPID noise an uninterrupted one would; and of
    the DDP rank, so that ranks do not draw the same ones for their shares (rank 0 draws what
    one process draws)."""
    return seed * 100003 + epoch + rank * 1_000_003


@dataclass
class EpochPass:
    loss: float  # mean per sample over the pass (0 for a pass of no samples)
    samples: int
    started: float  # time.perf_counter() at the start of the pass

    def seconds(self) -> float:
        """Seconds since the pass started (a stage logs them after its own evaluation)."""
        return round(time.perf_counter() - self.started, 2)


def train_epoch(loader: Any, epoch: int, seed: int, generator: torch.Generator, opt: torch.optim.Optimizer,
                loss_of: Callable[[Any], tuple[torch.Tensor, int]], *, desc: str, progress: bool, rank: int = 0,
                after_step: Callable[[], None] | None = None, stage: str = "training") -> EpochPass:
    """One pass over ``loader`` (an InMemoryLoader, StreamingLoader or PoolLoader): set its
    order and ``generator`` for ``epoch`` and ``rank``; for each batch, ``loss_of(batch)``
    gives (loss, samples), then one optimiser step and ``after_step`` (NPID's bank, MoCo's
    queue, which must change only after the step). A bar shows samples/s and the loss.

    A loss that is not finite stops the pass with a TrainingError naming ``stage`` and
    ``desc``: the weights it would leave are NaN, and no checkpoint is written after it, so
    the run's last checkpoint (the epoch before) stays as it was."""
    from tqdm import tqdm

    loader.set_epoch(epoch)
    generator.manual_seed(epoch_seed(seed, epoch, rank))
    seen, loss_sum, started = 0, 0.0, time.perf_counter()
    bar: Iterable = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress)
    for step, batch in enumerate(bar, 1):
        loss, n = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        value = loss.item()  # the one sync of the step, after it was queued
        if not math.isfinite(value):
            raise TrainingError(
                f"{stage} {desc}: the training loss is {value} at batch {step} of {len(loader)}; likely causes: a "
                "learning rate too high for the network, or inputs that are not finite",
                "the checkpoints of the epochs before are kept; start a new run (--name) with a lower --lr, and "
                "check the features with audiofx cache verify")
        seen += n
        loss_sum += value * n
        bar.set_postfix(samples_s=f"{seen / (time.perf_counter() - started):.0f}", loss=f"{loss_sum / seen:.3f}")
    return EpochPass(loss_sum / max(seen, 1), seen, started)


def optimiser_states(opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    """The optimiser, schedule and CPU RNG states a checkpoint keeps beside the model's."""
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}


def restore_optimiser_states(states: dict[str, Any], opt: torch.optim.Optimizer, sched: Any) -> None:
    """Put back what ``optimiser_states`` saved."""
    opt.load_state_dict(states["optimizer"])
    sched.load_state_dict(states["scheduler"])
    torch.set_rng_state(states["rng"])
