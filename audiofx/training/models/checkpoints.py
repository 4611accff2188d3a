"""A backbone's weights out of the checkpoint layouts in common use, found from the keys.

Researchers hold checkpoints from many codebases; none needs a converter. The rule:

1. Every dict of tensors inside the file is a candidate container (the file itself, its
   ``state_dict``, ``model``, ``teacher``, ``student``, ``resnet``, ``state_dict_ema``...).
2. An architecture's backbone is a known set of tensors with known shapes: torchvision's
   names (``conv1.weight``, ``layer1.0.bn1.running_mean``, ``features.0.weight``; timm's
   ResNets use the same) or the numbering of an ``nn.Sequential`` of the same children
   (lightly's ``backbone.0.weight``, audiofx's own ``body.0.weight``).
3. A backbone is found where a key prefix (``module.encoder_q.``, ``module.base_encoder.``,
   ``backbone.``, ``model.``, none...) makes every one of those tensors present. Whatever
   else the file holds is dropped by that rule, not by a list: classifiers (``fc.*``,
   ``classifier.*``), projection heads and predictors, queues, memory banks, optimizer state.
4. A file with two backbones holds an online network (trained by the gradient: MoCo's
   query encoder, MoCo v3's base encoder, BYOL's online network, DINO's student) and a
   momentum one (its running average: MoCo's key encoder, DINO's teacher, BYOL's target,
   solo-learn's momentum backbone, timm's EMA). ``branch="auto"`` takes the one each paper
   evaluates: DINO's teacher (Caron et al. 2021 evaluate the teacher), the online network
   for the rest (MoCo's linear protocol loads ``encoder_q``; MoCo v3's, ``base_encoder``).
   ``branch="online"`` or ``"momentum"`` picks the other.
5. With no architecture given, the one whose whole backbone is present with the right
   shapes and the most tensors is taken (a ResNet-34 file also holds every key of a
   ResNet-18); an architecture built around a torchvision one (ESResNet: a ResNet-50 with
   attention branches) takes that one's files, its own parts starting fresh (``fresh``),
   but a plain ResNet-50 file is a ResNet-50 unless ESResNet is asked for.

Files that match no layout, lack a backbone tensor or hold one of another shape get a
``ConfigError`` naming the file, the layout it looked like and the first missing or
mis-shaped key.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from audiofx.errors import ConfigError
from audiofx.training.models.encoders import ARCHS, EXTENDED, TORCHVISION, body_of, fresh_prefixes

BRANCHES = ("auto", "online", "momentum")
# Names (a container's key or a part of a key prefix) of the running-average copy of a network;
# any name starting with "momentum" is one too (momentum_encoder, momentum_backbone).
MOMENTUM_WORDS = {"encoder_k", "key_encoder", "teacher", "target", "target_network", "target_encoder", "ema",
                  "model_ema", "state_dict_ema"}
# torchvision ResNet children in order: audiofx's body is nn.Sequential(children[:-2]).
RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
# (word in the container path or prefix, the codebase it marks), first match wins.
LAYOUTS = (
    ("encoder_q", "MoCo v1/v2"), ("encoder_k", "MoCo v1/v2"),
    ("base_encoder", "MoCo v3"), ("momentum_encoder", "MoCo v3"),
    ("teacher", "DINO"), ("student", "DINO"),
    ("online_network", "BYOL"), ("target_network", "BYOL"),
    ("momentum_backbone", "solo-learn"), ("state_dict_ema", "timm (EMA weights)"),
    ("resnet", "SimCLR v2, converted"), ("body", "audiofx encoder"),
)  # matched against whole names (container keys, parts of the key prefix), never substrings
MAX_DEPTH = 3  # containers nest at most this deep (Lightning: state_dict -> model.*)


@dataclass(frozen=True)
class Backbone:
    arch: str
    layout: str  # e.g. "MoCo v1/v2, online network (state_dict/module.encoder_q.*)"
    state: dict[str, torch.Tensor]  # the encoder body's keys for Encoder.body.load_state_dict (strict
    # unless ``fresh``: then the parts the file lacks keep the new network's initialisation)
    tensors: int  # tensors taken from the file (BatchNorm counters a file lacks are not counted)
    fresh: int = 0  # tensors the file lacks by design (ESResNet's attention on ImageNet ResNet-50 weights)


@dataclass(frozen=True)
class _Match:
    arch: str
    path: tuple[str, ...]
    prefix: str
    naming: str  # torchvision or sequential
    source: dict[str, str]  # body key -> key in the container
    missing: tuple[str, ...]  # body keys absent (BatchNorm counters and fresh parts aside)
    fresh_missing: tuple[str, ...]  # keys of the arch's fresh parts the file lacks
    misshaped: tuple[tuple[str, tuple, tuple], ...]  # (container key, its shape, the arch's)
    expected: int

    @property
    def words(self) -> set[str]:
        """The names on the way to the backbone: container keys and the parts of the prefix."""
        return {w.lower() for w in (*self.path, *self.prefix.split(".")) if w}

    @property
    def branch(self) -> str:
        momentum = self.words & MOMENTUM_WORDS or any(w.startswith("momentum") for w in self.words)
        return "momentum" if momentum else "online"

    @property
    def complete(self) -> bool:
        return not self.missing and not self.misshaped


@functools.lru_cache(maxsize=None)
def _body_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Body key -> shape, built on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        body = body_of(arch)
    return {k: tuple(v.shape) for k, v in body.state_dict().items()}


def _torchvision_name(arch: str, key: str) -> str | None:
    """A body key as torchvision's model names it (None: the arch has no torchvision naming)."""
    if arch.startswith("resnet"):
        head, _, rest = key.partition(".")
        return f"{RESNET_CHILDREN[int(head)]}.{rest}"
    if arch == "densenet201":
        return f"features.{key[2:]}"  # body = Sequential(features, ReLU): 0.<features key>
    if arch in TORCHVISION:
        return f"features.{key}"  # VGG-16, AlexNet: the conv stack is the body
    if arch in EXTENDED:
        return key  # built with torchvision's module names: the same as its own
    return None


def _namings(arch: str) -> dict[str, dict[str, str]]:
    """naming -> {body key: name in a checkpoint}."""
    keys = list(_body_shapes(arch))
    out = {"sequential": {k: k for k in keys}}
    names = {k: _torchvision_name(arch, k) for k in keys} if _torchvision_name(arch, keys[0]) is not None else None
    if names is not None and names != out["sequential"]:  # ESResNet keeps torchvision's names: one naming
        out["torchvision"] = names
    return out


def _containers(obj: Any, path: tuple[str, ...] = (), depth: int = 0) -> list[tuple[tuple[str, ...], dict]]:
    """(path, dict) of every dict holding tensors under string keys, the file itself included."""
    if not isinstance(obj, dict) or depth > MAX_DEPTH:
        return []
    found = []
    if any(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        found.append((path, obj))
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, dict):
            found.extend(_containers(v, path + (k,), depth + 1))
    return found


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # older files (torchvision's first ResNets) lack them


def _matches(arch: str, containers) -> list[_Match]:
    shapes = _body_shapes(arch)
    fresh = {k for k in shapes if k.startswith(fresh_prefixes(arch))}
    needed = [k for k in shapes if not _is_counter(k) and k not in fresh]
    out = []
    for naming, names in _namings(arch).items():
        # prefixes are read off a few distinctive keys, so a file missing some still matches partly
        anchors = {names[k] for k in needed[:3] + needed[-3:]}
        for path, flat in containers:
            prefixes = {key[:-len(a)] for key in flat if isinstance(key, str) for a in anchors
                        if key.endswith(a) and (len(key) == len(a) or key[-len(a) - 1] == ".")}
            for prefix in prefixes:
                source = {k: prefix + names[k] for k in shapes
                          if isinstance(flat.get(prefix + names[k]), torch.Tensor)}
                missing = tuple(k for k in needed if k not in source)
                fresh_missing = tuple(k for k in sorted(fresh) if k not in source and not _is_counter(k))
                if any(k in source for k in fresh) and fresh_missing:  # parts of them: a damaged file
                    missing, fresh_missing = missing + fresh_missing, ()
                bad = tuple((name, tuple(flat[name].shape), shapes[k]) for k, name in source.items()
                            if tuple(flat[name].shape) != shapes[k])
                out.append(_Match(arch, path, prefix, naming, source, missing, fresh_missing, bad, len(needed)))
    return out


def _layout(root: dict, m: _Match, pair: bool = False) -> str:
    """The layout's name, e.g. "MoCo v1/v2, online network (state_dict/module.encoder_q.*)";
    ``pair``: the file holds an online and a momentum network, so which one is said."""
    words = m.words
    if "pytorch-lightning_version" in root:  # first: a Lightning module may name its parts anything
        label = "PyTorch Lightning (solo-learn)" if {"backbone", "momentum_backbone"} & words else "PyTorch Lightning"
    else:
        label = next((name for word, name in LAYOUTS if word in words), None)
    if label is None:
        if "backbone" in words:
            label = "lightly / solo-learn backbone"
        elif {"arch", "version"} <= set(root) and m.path == ("state_dict",):
            label = "timm training checkpoint"
        elif m.prefix.startswith("module."):
            label = "DistributedDataParallel state dict (SwAV, BYOL, Barlow Twins...)"
        elif m.path:
            label = f"state dict under '{m.path[-1]}' (SimCLR v1 converted, MoCo-style)"
        else:
            label = "torchvision / timm state dict"
    naming = ", nn.Sequential numbering" if m.naming == "sequential" and m.prefix != "body." else ""
    where = "/".join(m.path + (f"{m.prefix}*",))
    return f"{label}{f', {m.branch} network' if pair else ''} ({where}{naming})"


def find_backbone(obj: Any, path: str | Path, arch: str | None = None, branch: str = "auto",
                  option: str = "--init") -> Backbone:
    """The backbone of ``arch`` (or of the largest arch the file holds) in a loaded checkpoint."""
    if branch not in BRANCHES:
        raise ConfigError(f"unknown --init-branch {branch!r}", f"use one of {', '.join(BRANCHES)}")
    if arch is not None and arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}", f"use one of {', '.join(ARCHS)}")
    root = obj if isinstance(obj, dict) else {}
    containers = _containers(obj)
    if not containers:
        raise ConfigError(f"{option} {path} holds no tensors under names ({type(obj).__name__})",
                          "pass a state dict or a training checkpoint that holds one")
    matches = [m for a in ARCHS for m in _matches(a, containers)]
    complete = [m for m in matches if m.complete]
    if not complete:
        raise _no_backbone(root, containers, matches, path, arch, option)
    # the whole backbone with the most tensors is the file's network (a ResNet-34 also holds a
    # whole ResNet-18); of two that take the same tensors, the one with nothing left fresh
    largest = max(complete, key=lambda m: (len(m.source), -len(m.fresh_missing)))
    if arch is not None:
        mine = max((m for m in complete if m.arch == arch), key=lambda m: len(m.source), default=None)
        if mine is None or len(mine.source) < len(largest.source):
            raise ConfigError(f"{option} {path} holds {largest.arch} weights ({_layout(root, largest)}), not {arch}",
                              f"drop --arch, or pass --arch {largest.arch}")
    chosen_arch = arch or largest.arch
    complete = [m for m in complete if m.arch == chosen_arch]
    want = branch if branch != "auto" else ("momentum" if any("teacher" in m.words for m in complete) else "online")
    picked = [m for m in complete if m.branch == want]
    if not picked:
        have = "; ".join(sorted({_layout(root, m) for m in complete}))
        raise ConfigError(f"{option} {path} holds no {want} network for --init-branch {branch} (it holds: {have})",
                          f"pass --init-branch {complete[0].branch} or auto")
    # the same tensors matched twice (torchvision names at no prefix, Sequential numbering
    # under features.) are one backbone; two different ones at the same depth are ambiguous
    distinct: dict[tuple, _Match] = {}
    for m in sorted(picked, key=lambda m: (len(m.path), len(m.prefix), m.naming != "torchvision")):
        distinct.setdefault((m.path, frozenset(m.source.values())), m)
    ranked = list(distinct.values())
    tied = [m for m in ranked if (len(m.path), len(m.prefix)) == (len(ranked[0].path), len(ranked[0].prefix))]
    if len(tied) > 1:
        raise ConfigError(f"{option} {path} holds {len(tied)} {chosen_arch} backbones alike "
                          f"({'; '.join(_layout(root, m) for m in tied)})",
                          "save the one you mean as a state dict of its own")
    m = ranked[0]
    flat = dict(next(c for p, c in containers if p == m.path))
    shapes = _body_shapes(chosen_arch)
    fresh = fresh_prefixes(chosen_arch) if m.fresh_missing else ()  # left out: the new network's init stays
    state = {k: flat[m.source[k]] if k in m.source else torch.zeros((), dtype=torch.long)
             for k in shapes if not (fresh and k.startswith(fresh))}
    return Backbone(chosen_arch, _layout(root, m, pair=len({c.branch for c in complete}) > 1), state, len(m.source),
                    fresh=len(m.fresh_missing))


def _no_backbone(root, containers, matches, path, arch, option) -> ConfigError:
    """The one line for a file in which no arch's whole backbone is present with its shapes."""
    pool = [m for m in matches if arch is None or m.arch == arch] or matches
    best = max(pool, key=lambda m: (len(m.source) / m.expected, m.expected), default=None)
    if best is None or len(best.source) < best.expected / 2:
        keys = [k for k in (root or containers[0][1]) if isinstance(k, str)][:6]
        return ConfigError(f"{option} {path} matches no checkpoint layout audiofx reads "
                           f"{'for ' + arch + ' ' if arch else ''}(its keys begin {', '.join(keys)})",
                           "see docs/checkpoints.md for the layouts read, or save the backbone as a torchvision "
                           "state dict")
    if best.misshaped and not best.missing:
        key, have, want = best.misshaped[0]
        return ConfigError(f"{option} {path} looks like {_layout(root, best)} of a {best.arch}, but {key} is "
                           f"{list(have)} where a {best.arch} has {list(want)}",
                           "pass --arch with the network it was saved from (a wider ResNet does not fit)")
    first = best.missing[0]
    name = _namings(best.arch)[best.naming][first]
    return ConfigError(f"{option} {path} looks like {_layout(root, best)} of a {best.arch}, but lacks "
                       f"{len(best.missing)} of its {best.expected} backbone tensors (first: {best.prefix}{name})",
                       "the file may be truncated or hold another network; pass a complete checkpoint")
