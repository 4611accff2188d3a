"""Augmented copies of a decoded clip, made once at extraction for pretraining (Lin 2022: "I
take signal and then augment it through random flipping, padding, cropping, and pitch
shifting. I then convert the augmented signal into a log-Mel spectrogram").

Each copy: a time reversal with probability ``augment_flip``; a random offset of up to
``augment_shift`` of the clip, padding zeros on one side and cropping the other, so the
length stays; a pitch shift uniform in +-``augment_pitch`` semitones (librosa's, soxr
resampling). The draws come from a generator seeded by (``augment_seed``, the clip's path),
so the copies of a clip do not depend on which unit or machine makes them.
"""

from __future__ import annotations

import zlib

import numpy as np

from audiofx.config import FeatureConfig


def clip_generator(config: FeatureConfig, path: str) -> np.random.Generator:
    return np.random.default_rng([config.augment_seed, zlib.crc32(path.encode())])


def augmented_copy(audio: np.ndarray, config: FeatureConfig, rng: np.random.Generator) -> np.ndarray:
    """One augmented copy of a decoded clip (K, N) float32, of the same shape."""
    import librosa

    flip = rng.random() < config.augment_flip
    offset = int(round(rng.uniform(-config.augment_shift, config.augment_shift) * audio.shape[-1]))
    steps = float(rng.uniform(-config.augment_pitch, config.augment_pitch))
    out = audio[..., ::-1] if flip else audio
    if config.augment_pitch and steps:
        out = np.stack([librosa.effects.pitch_shift(np.ascontiguousarray(ch), sr=config.sample_rate, n_steps=steps,
                                                    res_type="soxr_hq") for ch in out])
    shifted = np.zeros_like(audio)
    n = audio.shape[-1]
    if offset >= 0:  # zeros padded at the start, the end cropped
        shifted[..., offset:] = out[..., :n - offset]
    else:  # the start cropped, zeros padded at the end
        shifted[..., :n + offset] = out[..., -offset:]
    return shifted.astype(np.float32, copy=False)


def with_copies(audio: np.ndarray, config: FeatureConfig, path: str) -> list[np.ndarray]:
    """The clip and its ``augment_copies`` augmented copies, in the order they are stored."""
    rng = clip_generator(config, path)
    return [audio, *(augmented_copy(audio, config, rng) for _ in range(config.augment_copies))]
