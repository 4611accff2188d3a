"""Batched multi-window log-mel and banded log-STFT features in torch (CPU or GPU).

Pure functions of tensors: ``compute_features(audio, config)`` maps a batch of decoded clips
(B, K, N) - K = 1 (mono) or 2 (stereo) audio channels - to features (B, C, bins, T).

Why the mel filterbank comes from librosa and not torchaudio: torchaudio's
``melscale_fbanks`` lays its frequency grid as linspace(0, sr // 2, n_freqs), which is off
for odd n_fft (2205, 551 samples: up to 12.7 dB from librosa). librosa's
``filters.mel(htk=True, norm=None)`` is the exact HTK filterbank torchaudio meant to give,
so we build it once with librosa and multiply it ourselves.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from audiofx.config import FeatureConfig


@lru_cache(maxsize=64)
def _mel_filterbank_np(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float, htk: bool, norm: str) -> np.ndarray:
    import librosa

    return librosa.filters.mel(
        sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk, norm=None if norm == "none" else norm,
        dtype=np.float32,
    )


def _filterbank_np(config: FeatureConfig) -> np.ndarray:
    return _mel_filterbank_np(
        config.sample_rate, config.fft_size, config.n_mels, float(config.fmin),
        float(config.fmax or config.sample_rate / 2), config.mel_scale == "htk", config.mel_norm,
    )


class BandedFilterbank:
    """Applies the mel filterbank to a squared STFT laid out as (B, T, F, 2) - re^2, im^2 -
    without any copy of the spectrogram.

    torch.stft's output is (B, F, T) with T-major memory, i.e. (B, T, F) contiguous. Viewing
    it as (B, T, 2F) and multiplying by the filterbank with every column duplicated (one for
    re^2, one for im^2) sums the power and applies the filters in one matmul.

    A mel filter covers a narrow band, so the dense (128 x 2206) product does ~14x more
    multiply-adds than needed; on one CPU core that was a third of a clip's time. The filters
    are cut into blocks of 16 consecutive ones, each multiplied with only the bins where it is
    non-zero (13% of the dense work), still plain matmuls; 16 was fastest on one core (8: too
    narrow for the GEMM kernel, 32+: more zeros). On GPU the dense product is cheap.
    """

    def __init__(self, fb: np.ndarray, device: torch.device | str = "cpu", block: int = 16):
        self.n_mels = fb.shape[0]
        fb2 = np.repeat(fb, 2, axis=1).T.copy()  # (2F, M): rows 2f and 2f+1 both hold bin f
        self.dense = torch.from_numpy(fb2).to(device)
        self.blocks: list[tuple[int, int, int, int, torch.Tensor]] = []
        for r0 in range(0, fb.shape[0], block):
            r1 = min(r0 + block, fb.shape[0])
            cols = np.nonzero(fb[r0:r1].any(axis=0))[0]
            if len(cols):
                c0, c1 = 2 * int(cols[0]), 2 * (int(cols[-1]) + 1)
                self.blocks.append((r0, r1, c0, c1, torch.from_numpy(np.ascontiguousarray(fb2[c0:c1, r0:r1])).to(device)))

    def __call__(self, squared: torch.Tensor) -> torch.Tensor:
        """(B, T, 2F) interleaved re^2/im^2 -> mel power (B, T, n_mels)."""
        if squared.device.type != "cpu":
            return torch.matmul(squared, self.dense)
        out = squared.new_zeros(squared.shape[0], squared.shape[1], self.n_mels)
        for r0, r1, c0, c1, sub in self.blocks:
            torch.matmul(squared[:, :, c0:c1], sub, out=out[:, :, r0:r1])
        return out


_BANDED: dict[tuple, BandedFilterbank] = {}


def banded_filterbank(config: FeatureConfig, device: torch.device | str = "cpu") -> BandedFilterbank:
    key = (config.sample_rate, config.fft_size, config.n_mels, config.fmin, config.fmax, config.mel_scale,
           config.mel_norm, str(device))
    if key not in _BANDED:
        _BANDED[key] = BandedFilterbank(_filterbank_np(config), device)
    return _BANDED[key]


@lru_cache(maxsize=64)
def _window_np(name: str, length: int) -> np.ndarray:
    from scipy.signal import get_window

    # fftbins=True gives the periodic window, as librosa and torch.hann_window use.
    return get_window(name, length, fftbins=True).astype(np.float32)


def window(name: str, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(_window_np(name, length)).to(device)


def stft_power(wave: torch.Tensor, n_fft: int, hop: int, win_length: int, config: FeatureConfig) -> torch.Tensor:
    """(B, N) -> complex STFT viewed as real and squared in place: (B, T, F, 2), contiguous.

    The caller sums the last axis (or lets a matmul do it), which saves a full pass over the
    spectrogram compared with ``stft.abs() ** 2``.
    """
    stft = _stft_cpu if wave.device.type == "cpu" else _stft_torch
    return torch.view_as_real(stft(wave, n_fft, hop, win_length, config)).pow_(2)


def _stft_torch(wave: torch.Tensor, n_fft: int, hop: int, win_length: int, config: FeatureConfig) -> torch.Tensor:
    """torch.stft as (B, T, F) complex, contiguous (the GPU path)."""
    spec = torch.stft(
        wave, n_fft=n_fft, hop_length=hop, win_length=win_length,
        window=window(config.window, win_length, wave.device),
        center=config.center, pad_mode=config.pad_mode, return_complex=True,
    )
    return spec.transpose(1, 2).contiguous()


def _stft_cpu(wave: torch.Tensor, n_fft: int, hop: int, win_length: int, config: FeatureConfig) -> torch.Tensor:
    """torch.stft's frames, transformed with scipy.fft: (B, T, F) complex64.

    scipy's pocketfft keeps float32 and is 1.4x (n_fft 4410) to 2.2x (n_fft 2205) faster
    than torch.fft on one core, and the FFT is most of the feature time. Only the windowed
    win_length samples of each frame are taken and zero-padded to n_fft at the end;
    torch.stft centres the window in the frame instead, which is a circular shift of the
    same frame: the phase differs, the power does not.
    """
    import scipy.fft

    if config.center:
        wave = F.pad(wave.unsqueeze(1), (n_fft // 2, n_fft // 2), mode=config.pad_mode).squeeze(1)
    left = (n_fft - win_length) // 2
    frames = wave[:, left:].unfold(-1, win_length, hop)
    n_frames = 1 + (wave.shape[-1] - n_fft) // hop  # what torch.stft yields for this length
    # Windowed frames go straight into a zero-padded buffer of n_fft columns (scipy would
    # otherwise copy every frame once more to pad it). The buffer is kept between calls: its
    # padding stays zero, and a fresh 50 MB buffer per call cost more in page faults and
    # zero-filling than the FFT itself.
    buf = _frame_buffer(frames.shape[0], n_frames, n_fft, win_length)
    torch.mul(frames[:, :n_frames], window(config.window, win_length), out=buf[:, :, :win_length])
    return torch.from_numpy(scipy.fft.rfft(buf.numpy(), axis=-1, workers=1))


_BUFFERS: dict[tuple[int, int, int, int], torch.Tensor] = {}


def _frame_buffer(batch: int, n_frames: int, n_fft: int, win_length: int) -> torch.Tensor:
    """A (batch, n_frames, n_fft) float32 buffer whose columns from win_length on are zero.

    Only columns [:win_length] are ever written, so the zeros survive reuse. One buffer per
    shape and window; a few shapes occur per process (one per channel, plus a short last batch).
    """
    key = (batch, n_frames, n_fft, win_length)
    if key not in _BUFFERS:
        if len(_BUFFERS) >= 8:
            _BUFFERS.clear()
        _BUFFERS[key] = torch.zeros(batch, n_frames, n_fft)
    return _BUFFERS[key]


def power_spectrogram(wave: torch.Tensor, n_fft: int, hop: int, win_length: int, config: FeatureConfig) -> torch.Tensor:
    """(B, N) -> |STFT| ** power, (B, F, T)."""
    squared = stft_power(wave, n_fft, hop, win_length, config).sum(-1).transpose(1, 2)
    return squared if config.power == 2.0 else squared.pow_(config.power / 2.0)


def log_mel(wave: torch.Tensor, config: FeatureConfig, channel: int, fb: BandedFilterbank) -> torch.Tensor:
    """(B, N) -> natural log of the mel spectrogram of one channel's (window, hop): (B, n_mels, T_c)."""
    win = config.samples(config.windows_ms[channel])
    hop = config.samples(config.hops_ms[channel])
    sq = stft_power(wave, config.fft_size, hop, win, config)  # (B, T, F, 2)
    if config.power != 2.0:  # |X|^p: sum re^2 + im^2 first, then put it back in the interleaved layout
        mag = sq.sum(-1, keepdim=True).pow_(config.power / 2.0)
        sq = torch.cat([mag, torch.zeros_like(mag)], dim=-1)
    b, t, f, _ = sq.shape
    mel = fb(sq.view(b, t, 2 * f))  # (B, T, n_mels)
    return torch.log(mel.add_(config.log_offset)).transpose(1, 2)


def resize(spec: torch.Tensor, bins: int, frames: int) -> torch.Tensor:
    """(B, bins_in, T_in) -> (B, bins, frames), bilinear with antialiasing.

    This is what torchvision's Resize did to the spectrogram images in the Palanisamy code;
    with bins unchanged it only resamples the time axis.
    """
    if spec.shape[-2:] == (bins, frames):
        return spec
    out = F.interpolate(spec.unsqueeze(1), size=(bins, frames), mode="bilinear", antialias=True, align_corners=False)
    return out.squeeze(1)


def select_source(audio: torch.Tensor, source: str) -> torch.Tensor:
    """(B, K, N) -> (B, N): mono / mid = mean of the channels, left = first, right = last."""
    if source in ("mono", "mid"):
        return audio[:, 0] if audio.shape[1] == 1 else audio.mean(dim=1)
    return audio[:, 0] if source == "left" else audio[:, -1]


def compute_features(audio: torch.Tensor, config: FeatureConfig) -> torch.Tensor:
    """Decoded clips (B, K, N) float32 -> features (B, C, bins, T) float32."""
    if audio.dim() == 2:
        audio = audio.unsqueeze(1)
    bins, frames = config.out_bins, config.out_frames
    if config.kind == "stft_bands":
        return _stft_bands(select_source(audio, config.sources[0]), config)
    fb = banded_filterbank(config, audio.device)
    waves: dict[str, torch.Tensor] = {}
    channels = []
    for c, source in enumerate(config.sources):
        if source not in waves:
            waves[source] = select_source(audio, source)
        channels.append(resize(log_mel(waves[source], config, c, fb), bins, frames))
    return torch.stack(channels, dim=1)


def _stft_bands(wave: torch.Tensor, config: FeatureConfig) -> torch.Tensor:
    """Hornauer et al. (ESResNet input): one log-power STFT cut into contiguous frequency
    bands of (almost) equal height, each band resized to (bins, T) and used as one channel."""
    win = config.samples(config.windows_ms[0])
    hop = config.samples(config.hops_ms[0])
    logpow = torch.log(power_spectrogram(wave, config.fft_size, hop, win, config).add_(config.log_offset))
    edges = np.linspace(0, logpow.shape[1], config.bands + 1).round().astype(int)
    bands = [resize(logpow[:, lo:hi], config.out_bins, config.out_frames) for lo, hi in zip(edges[:-1], edges[1:])]
    return torch.stack(bands, dim=1)
