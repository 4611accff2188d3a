"""Feature configuration: a frozen dataclass, named presets, canonical JSON and content keys.

Precedence when a config is resolved: field defaults < the dataset's defaults (rate, clip
length, frame count) < the preset < ``--set key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from audiofx.errors import ConfigError

# Bump whenever the feature math changes: it is part of every content key, so a store
# written by older code is never served for the new code.
FEATURE_CODE_VERSION = 1

SOURCES = ("mono", "left", "right", "mid")
KINDS = ("logmel", "stft_bands")
PAD_MODES = ("constant", "reflect", "replicate", "circular")  # torch.stft's
FITS = ("pad", "resize")
# Fields added after stores were written, at the value every earlier store was made with:
# left out of to_dict (and so of feature keys) at that value.
LATER_FIELDS: dict[str, Any] = {"fit": "pad", "augment_copies": 0, "augment_seed": 0, "augment_flip": 0.5,
                                 "augment_shift": 0.25, "augment_pitch": 2.0}
_ABSENT = object()


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that decides the numbers in a stored feature array."""

    kind: str = "logmel"  # logmel: one log-mel per channel; stft_bands: one log-power STFT cut into bands
    sample_rate: int = 44100  # clips are resampled to this rate
    clip_seconds: float = 5.0  # clips are padded with zeros or cropped to this length
    frames: int = 250  # T: every channel is resized to this many frames (0: keep channel 0's count)
    windows_ms: tuple[float, ...] = (25.0, 50.0, 100.0)  # one window length per channel
    hops_ms: tuple[float, ...] = (10.0, 10.0, 50.0)  # one hop per channel
    sources: tuple[str, ...] = ("mono", "mono", "mono")  # per channel: mono, left, right or mid
    n_fft: int = 0  # 0: the longest window in samples (4410 at 44.1 kHz), as in the papers
    window: str = "hann"  # any scipy.signal.get_window name
    center: bool = True
    pad_mode: str = "reflect"
    power: float = 2.0
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float = 0.0  # 0: sample_rate / 2
    mel_scale: str = "htk"  # htk (torchaudio's default, used by the papers' code) or slaney
    mel_norm: str = "none"  # none or slaney (area normalisation)
    log_offset: float = 1e-6  # log(mel + offset): finite even for digital silence
    bands: int = 3  # stft_bands: number of frequency bands, one per channel
    dtype: str = "float16"  # storage dtype
    # pad: every clip padded with zeros (or cropped) to clip_seconds, then its spectrogram resized
    # to `frames`; resize: cropped at clip_seconds but never padded, each clip's own spectrogram
    # resized to `frames` (Shin et al.: "we fixed their length to 4 s by resizing").
    fit: str = "pad"
    # Waveform augmentation for pretraining (Lin 2022: "random flipping, padding, cropping, and
    # pitch shifting" before the mel): N augmented copies of each clip stored after the clip
    # itself, copy k in channels [k * C, (k + 1) * C); each copy seeded from (augment_seed, the
    # clip's path), so a rerun or another machine makes the same copies.
    augment_copies: int = 0
    augment_seed: int = 0
    augment_flip: float = 0.5  # probability of a time reversal
    augment_shift: float = 0.25  # largest offset of the random padding / cropping, a share of the clip
    augment_pitch: float = 2.0  # largest pitch shift, semitones either way

    # -- derived values -------------------------------------------------------------
    @property
    def base_channels(self) -> int:
        """Channels of one copy of a clip."""
        return self.bands if self.kind == "stft_bands" else len(self.windows_ms)

    @property
    def copies(self) -> int:
        """Copies of each clip stored: the clip and its augmented copies."""
        return 1 + self.augment_copies

    @property
    def channels(self) -> int:
        """Stored channels: every copy's, one copy after another."""
        return self.base_channels * self.copies

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    def samples(self, ms: float) -> int:
        return int(round(ms * self.sample_rate / 1000.0))

    @property
    def fft_size(self) -> int:
        return self.n_fft or max(self.samples(w) for w in self.windows_ms)

    @property
    def needs_stereo(self) -> bool:
        return any(s != "mono" for s in self.sources)

    def natural_frames(self, channel: int = 0) -> int:
        hop = self.samples(self.hops_ms[channel])
        n = self.clip_samples
        return 1 + n // hop if self.center else 1 + (n - self.fft_size) // hop

    @property
    def out_frames(self) -> int:
        return self.frames or self.natural_frames(0)

    @property
    def out_bins(self) -> int:
        return self.n_mels

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one clip's features: (channels, bins, frames)."""
        return (self.channels, self.out_bins, self.out_frames)

    def validate(self) -> "FeatureConfig":
        def bad(msg: str) -> ConfigError:
            return ConfigError(msg, "fix the value given with --set or the preset")

        if self.kind not in KINDS:
            raise bad(f"feature kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        numbers = {"sample_rate": self.sample_rate, "clip_seconds": self.clip_seconds, "power": self.power,
                   "fmin": self.fmin, "fmax": self.fmax, "log_offset": self.log_offset,
                   "augment_flip": self.augment_flip, "augment_shift": self.augment_shift,
                   "augment_pitch": self.augment_pitch,
                   **{f"windows_ms[{i}]": w for i, w in enumerate(self.windows_ms)},
                   **{f"hops_ms[{i}]": h for i, h in enumerate(self.hops_ms)}}
        for name, value in numbers.items():
            if not math.isfinite(value):
                raise bad(f"{name} must be a finite number, got {value}")
        if self.sample_rate <= 0 or self.clip_seconds <= 0:
            raise bad("sample_rate and clip_seconds must be positive")
        if not (len(self.windows_ms) == len(self.hops_ms) == len(self.sources)) or not self.windows_ms:
            raise bad("windows_ms, hops_ms and sources need one entry per channel, and at least one")
        if any(s not in SOURCES for s in self.sources):
            raise bad(f"sources must each be one of {', '.join(SOURCES)}, got {self.sources}")
        if any(self.samples(w) < 2 for w in self.windows_ms) or any(self.samples(h) < 1 for h in self.hops_ms):
            raise bad("every window must span at least 2 samples and every hop at least 1")
        if self.fft_size < max(self.samples(w) for w in self.windows_ms):
            raise bad(f"n_fft={self.n_fft} is shorter than the longest window")
        if self.n_mels < 1 or self.frames < 0 or self.bands < 1:
            raise bad("n_mels, bands must be >= 1 and frames >= 0")
        if self.mel_scale not in ("htk", "slaney") or self.mel_norm not in ("none", "slaney"):
            raise bad("mel_scale must be htk or slaney, mel_norm none or slaney")
        if self.fmax and self.fmax > self.sample_rate / 2:
            raise bad(f"fmax={self.fmax} is above the Nyquist frequency {self.sample_rate / 2}")
        top = self.fmax or self.sample_rate / 2
        if self.fmin < 0 or self.fmin >= top:
            raise bad(f"fmin={self.fmin} must be at least 0 and below {'fmax' if self.fmax else 'the Nyquist frequency'} "
                      f"({top:g} Hz): the mel bands would be empty")
        if self.log_offset <= 0:
            raise bad(f"log_offset={self.log_offset} must be above 0: log(mel + offset) of a silent band is not finite")
        if self.power <= 0:
            raise bad(f"power={self.power} must be above 0 (1: magnitude, 2: power)")
        if self.pad_mode not in PAD_MODES:
            raise bad(f"pad_mode {self.pad_mode!r} is unknown; use one of {', '.join(PAD_MODES)}")
        try:
            from scipy.signal import get_window

            get_window(self.window, 8)
        except (ValueError, TypeError):
            raise bad(f"window {self.window!r} is not a window scipy.signal.get_window knows (hann, hamming, "
                      "blackmanharris, ...)") from None
        if self.dtype not in ("float16", "float32"):
            raise bad("dtype must be float16 or float32")
        if self.kind == "stft_bands" and self.bands > self.fft_size // 2 + 1:
            raise bad("more bands than STFT bins")
        if self.fit not in FITS:
            raise bad(f"fit {self.fit!r} is unknown; use one of {', '.join(FITS)}")
        if self.fit == "resize" and not self.frames:
            raise bad("fit=resize brings every clip to `frames` frames, so frames must be above 0")
        if self.augment_copies < 0 or not 0 <= self.augment_flip <= 1 or not 0 <= self.augment_shift < 1 \
                or self.augment_pitch < 0:
            raise bad("augment_copies must be 0 or more, augment_flip a probability, augment_shift from 0 to below 1 "
                      "and augment_pitch 0 or more")
        if self.augment_seed < 0:
            raise bad(f"augment_seed={self.augment_seed} must be 0 or more")
        unused = [k for k in ("augment_seed", "augment_flip", "augment_shift", "augment_pitch")
                  if not self.augment_copies and getattr(self, k) != LATER_FIELDS[k]]
        if unused:  # it would change the feature key and store the same features twice
            raise bad(f"{unused[0]} shapes the augmented copies, and augment_copies is 0: add --set augment_copies=N "
                      f"or drop --set {unused[0]}")
        if self.augment_copies and self.fit == "resize":
            raise bad("augment_copies needs clips of one length (fit=pad): a copy's padding and cropping is within it")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fields, without those added after stores were written while they are at their
        defaults: every feature key and manifest written before they existed stays valid."""
        return {k: v for k, v in dataclasses.asdict(self).items() if LATER_FIELDS.get(k, _ABSENT) != v}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"unknown feature option {key!r}", f"known options: {', '.join(known)}")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


# Presets name whole recipes (DESIGN section 2). Values here override the dataset's
# defaults; --set overrides both.
PRESETS: dict[str, dict[str, Any]] = {
    # Shin et al. 2021 after Palanisamy et al. 2020: (window, hop) = (25,10), (50,10), (100,50) ms.
    "shin2021": {},
    # Palanisamy et al. 2020's own recipe: hops 10/25/50 ms.
    "palanisamy2020": {"hops_ms": (10.0, 25.0, 50.0)},
    # Hornauer et al. 2021 (ESResNet input): one log-power STFT, 2048-point FFT at 44.1 kHz,
    # 1654-sample Blackman-Harris window, 561-sample hop, cut into three frequency bands.
    "hornauer2021": {
        "kind": "stft_bands",
        "sample_rate": 44100,
        "windows_ms": (1654 / 44.1,),
        "hops_ms": (561 / 44.1,),
        "sources": ("mono",),
        "n_fft": 2048,
        "window": "blackmanharris",
        "bands": 3,
    },
    # Zhou et al. 2019: "The sampling rate is 48 kHz ... The frame length is 46.4ms while the
    # frame shift is 23.2ms ... we calculate the amplitude of each bin ... 128-bank mel-scale
    # filter banks followed by the logarithm" (section 4.1): magnitude (power 1) at 48 kHz,
    # one log-mel on each of the left, right and average ("mid") channels, natural frames.
    "zhou2019": {
        "sample_rate": 48000,
        "windows_ms": (46.4,) * 3,
        "hops_ms": (23.2,) * 3,
        "sources": ("left", "right", "mid"),
        "power": 1.0,
        "frames": 0,
    },
    # Lin 2022: "for simplicity, I just stack the three log-Mel spectrograms for the three input
    # channels" (section 2.1): one log-mel, stored once and repeated on the network's 3 input
    # channels (models/encoders.py). Lin follows ESResNet's STFT otherwise and gives no mel
    # settings: its 2048-point FFT, 1654-sample window and 561-sample hop at 44.1 kHz, 128
    # HTK mel bands (audiofx's choice where the text is silent).
    "lin2022": {
        "sample_rate": 44100,
        "windows_ms": (1654 / 44.1,),
        "hops_ms": (561 / 44.1,),
        "sources": ("mono",),
        "n_fft": 2048,
    },
}

FEATURE_FIELDS = {f.name for f in dataclasses.fields(FeatureConfig)}


def parse_value(text: str) -> Any:
    """Parse a --set value: JSON if it parses (numbers, true/false, null), a comma list as a
    tuple, else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "," in text:
        return tuple(parse_value(part.strip()) for part in text.split(","))
    return text


def parse_overrides(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r} is not key=value", "write it as --set n_mels=64")
        key, _, value = pair.partition("=")
        out[key.strip()] = parse_value(value.strip())
    return out


def _coerce(name: str, value: Any) -> Any:
    """Bring a parsed --set value to the field's type (tuple fields accept one number)."""
    default = getattr(FeatureConfig(), name)

    def number(v: Any, kind: type) -> int | float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{name} must be a number, got {v!r}", f"write --set {name}=<number>")
        if not math.isfinite(v):  # JSON reads NaN and Infinity too: no feature option is defined with them
            raise ConfigError(f"{name} must be a finite number, got {v!r}", f"write --set {name}=<number>")
        if kind is int and v != int(v):
            raise ConfigError(f"{name} must be an integer, got {v!r}", f"write --set {name}=<integer>")
        return kind(v)

    if isinstance(default, tuple):
        items = value if isinstance(value, (tuple, list)) else (value,)
        return tuple(number(v, float) if isinstance(default[0], float) else str(v) for v in items)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}", f"write --set {name}=true")
        return value
    if isinstance(default, (int, float)):
        return number(value, type(default))
    if value is None:
        return "none"
    return str(value)


def split_overrides(overrides: Mapping[str, Any], dataset_options: Mapping[str, Any]) -> tuple[dict, dict]:
    """--set values as (feature options, dataset options); a key that is neither is a ConfigError."""
    features, options = {}, {}
    for key, value in overrides.items():
        if key in FEATURE_FIELDS:
            features[key] = value
        elif key in dataset_options:
            options[key] = value
        else:
            raise ConfigError(
                f"unknown option {key!r} for --set",
                f"feature options: {', '.join(sorted(FEATURE_FIELDS))}; dataset options: {', '.join(dataset_options) or 'none'}",
            )
    return features, options


def resolve_feature_config(
    dataset_defaults: Mapping[str, Any],
    preset: str = "shin2021",
    overrides: Mapping[str, Any] | None = None,
) -> FeatureConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}", f"known presets: {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(dataset_defaults)
    values.update(PRESETS[preset])
    for key, value in (overrides or {}).items():
        if key not in FEATURE_FIELDS:
            raise ConfigError(f"unknown feature option {key!r}", f"known options: {', '.join(sorted(FEATURE_FIELDS))}")
        values[key] = _coerce(key, value)
    return FeatureConfig(**values).validate()


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configs give equal bytes."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=list)


def feature_key(config: FeatureConfig, dataset_options: Mapping[str, Any] | None = None) -> str:
    """Short content key of a store group: the feature config, the feature code version and
    the dataset options that change which clips go where (folds, split file, seed)."""
    payload = {
        "feature_code_version": FEATURE_CODE_VERSION,
        "features": config.to_dict(),
        "dataset_options": dict(dataset_options or {}),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]
