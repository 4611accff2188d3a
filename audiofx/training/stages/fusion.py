"""Zhou et al. 2019's sample expansion and late fusion: pure functions of tensors, and
``zhou_samples``, a set's clips as the samples fine-tuning trains on.

A clip (C, F, T) becomes several samples that all carry the clip's label:
- ``split_fragments``: N equal time fragments (Zhou: 6 fragments of a 10 s scene);
- ``expand_channels``: one sample per channel (left, right, mid for the ``zhou2019`` preset),
  each repeated to 3 channels so that ImageNet-style 3-channel encoders take it.
Each function returns the samples and ``clip_index``, the row of the source clip of every
sample. At test time ``fuse_posteriors`` averages the (softmax, or sigmoid for multi-label) posteriors of a clip's samples
into one prediction per clip. Expansions compose: map the second ``clip_index`` through the
first (``first[second]``).
"""

from __future__ import annotations

import dataclasses

import torch

from audiofx.errors import ConfigError
from audiofx.training.data.statistics import channel_stats


def split_fragments(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clips, C, F, T) -> (clips * n, C, F, T // n) and the source clip of every fragment.

    Fragment j of clip i is row i * n + j: ``x[i, :, :, j * L:(j + 1) * L]`` with L = T // n.
    The last T - n * L frames of every clip are dropped (fewer than n frames), so that all
    fragments have one length and batch together. n = 1 returns ``x`` itself, untouched.
    """
    if n < 1:
        raise ConfigError(f"--fragments must be at least 1, got {n}", "pass --fragments 1 (whole clips) or more")
    clips, t = x.shape[0], x.shape[-1]
    index = torch.arange(clips, device=x.device).repeat_interleave(n)
    if n == 1:
        return x, index
    length = t // n
    if length == 0:
        raise ConfigError(f"cannot cut {t} frames into {n} fragments", f"use --fragments {t} or fewer")
    # (clips, C, F, n, L) -> (clips, n, C, F, L): one copy, fragments of a clip side by side.
    parts = x[..., :n * length].unflatten(-1, (n, length)).permute(0, 3, 1, 2, 4)
    return parts.reshape(clips * n, *x.shape[1:-1], length), index


def expand_channels(x: torch.Tensor, repeat: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(clips, C, F, T) -> (clips * C, repeat, F, T): channel c of clip i is row i * C + c,
    repeated ``repeat`` times, and the source clip of every row.

    The result is a view of ``x`` (the repeat has stride 0), so the expansion costs no memory;
    a batch drawn from it by indexing is an ordinary tensor.
    """
    clips, c = x.shape[0], x.shape[1]
    index = torch.arange(clips, device=x.device).repeat_interleave(c)
    return x.reshape(clips * c, 1, *x.shape[2:]).expand(-1, repeat, -1, -1), index


def mean_per_clip(values: torch.Tensor, clip_index: torch.Tensor, n_clips: int) -> torch.Tensor:
    """(samples, D) -> (n_clips, D): the mean of every clip's rows (posteriors, embeddings).

    Every clip must have at least one sample (it would have no value otherwise).
    """
    clip_index = clip_index.to(values.device)
    counts = torch.bincount(clip_index, minlength=n_clips)
    if counts.numel() != n_clips or bool((counts == 0).any()):
        raise ValueError(f"clip_index must name every clip in [0, {n_clips}) at least once")
    total = torch.zeros(n_clips, values.shape[1], dtype=values.dtype, device=values.device)
    total.index_add_(0, clip_index, values)
    return total / counts.unsqueeze(1).to(values.dtype)


def fuse_posteriors(logits: torch.Tensor, clip_index: torch.Tensor, n_clips: int,
                    multilabel: bool = False) -> torch.Tensor:
    """Late fusion: the mean posterior of every clip's samples, (n_clips, classes): softmax
    posteriors, or per-class sigmoid posteriors for multi-label sets."""
    probs = torch.sigmoid(logits.float()) if multilabel else torch.softmax(logits.float(), dim=1)
    return mean_per_clip(probs, clip_index, n_clips)


def standardise_(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(x - mean) / std in place, in chunks (computed in float32, stored in x's dtype)."""
    for i in range(0, x.shape[0], chunk):
        x[i:i + chunk] = ((x[i:i + chunk].float() - mean) / std).to(x.dtype)
    return x


def zhou_samples(data, fragments: int, channel_fusion: bool, stats=None):
    """A set's clips as Zhou et al.'s samples: ``(samples, clip_index, loop_stats, stats)``.

    Fragments first (``split_fragments``), then channels (``expand_channels``); every sample
    carries its clip's label and ``clip_index[k]`` is the clip (row of ``data``) of sample k.
    ``stats`` are the training set's per-channel (mean, std), computed here when None (the
    training set itself, over its fragments). With channel fusion a sample's 3 channels are
    copies of one source channel, so inputs are standardised here, before the expansion, with
    that source channel's statistics, and the returned (mean, std) for the training loop are
    (0, 1); otherwise they are the per-channel statistics, applied per batch as usual.
    ``stats`` (the per-channel statistics) are returned too, for the test set and the checkpoint.
    """
    x, clip_index = split_fragments(data.x, fragments)
    mean, std = stats if stats is not None else channel_stats(x)
    loop_stats = (mean, std)
    if channel_fusion:
        # The subset is this fold's own copy, and split_fragments copies when fragments > 1:
        # clone only when x is still the caller's tensor, then standardise in place (float16).
        x = standardise_(x.clone() if x is data.x else x, mean, std)
        x, channel_index = expand_channels(x)
        clip_index = clip_index[channel_index]
        loop_stats = (torch.zeros(1, 1, 1, 1, device=x.device), torch.ones(1, 1, 1, 1, device=x.device))
    rows = clip_index.tolist()
    samples = dataclasses.replace(
        data, x=x, y=data.y[clip_index.to(data.y.device)], index=torch.arange(len(rows), device=data.index.device),
        clips=[data.clips[i] for i in rows], fold_of=[data.fold_of[i] for i in rows],
    )
    return samples, clip_index, loop_stats, (mean, std)
