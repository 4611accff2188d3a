"""librosa reference implementation of the same features, one clip at a time.

Used by the tests (parity with the torch path) and by the benchmark baseline. It shares
only the final time-axis resize with the torch path (the papers resized with torchvision).
"""

from __future__ import annotations

import numpy as np
import torch

from audiofx.config import FeatureConfig
from audiofx.features.melspec import resize


def _source(audio: np.ndarray, source: str) -> np.ndarray:
    if source in ("mono", "mid"):
        return audio.mean(axis=0)
    return audio[0] if source == "left" else audio[-1]


def librosa_channel(wave: np.ndarray, config: FeatureConfig, channel: int) -> np.ndarray:
    """Log-mel of one channel before resizing: (n_mels, T_c)."""
    import librosa

    mel = librosa.feature.melspectrogram(
        y=wave, sr=config.sample_rate, n_fft=config.fft_size,
        hop_length=config.samples(config.hops_ms[channel]), win_length=config.samples(config.windows_ms[channel]),
        window=config.window, center=config.center, pad_mode=config.pad_mode, power=config.power,
        n_mels=config.n_mels, fmin=config.fmin, fmax=config.fmax or config.sample_rate / 2,
        htk=config.mel_scale == "htk", norm=None if config.mel_norm == "none" else config.mel_norm,
    )
    return np.log(mel + config.log_offset)


def librosa_features(audio: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """One decoded clip (K, N) or (N,) -> (C, bins, T) float32, logmel kind only."""
    if config.kind != "logmel":
        raise ValueError("the librosa reference covers the logmel kind")
    audio = np.atleast_2d(audio).astype(np.float32)
    out = []
    for c, source in enumerate(config.sources):
        spec = torch.from_numpy(librosa_channel(_source(audio, source), config, c).astype(np.float32))
        out.append(resize(spec.unsqueeze(0), config.out_bins, config.out_frames)[0].numpy())
    return np.stack(out)
