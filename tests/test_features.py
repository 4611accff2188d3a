"""The torch feature path against the librosa reference (DESIGN section 2).

Tolerance: the torch and librosa paths agree to 1e-3 in natural-log units (0.004 dB) on
every mel bin and frame, before and after the time resize. Both compute in float32; the
measured difference is ~1e-5, the bound leaves room for BLAS and FFT differences across
machines while still catching any real recipe error (a wrong filterbank or window is off
by 0.1-12 dB).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audiofx.config import FeatureConfig, resolve_feature_config
from audiofx.features.melspec import banded_filterbank, compute_features, log_mel
from audiofx.features.reference import librosa_channel, librosa_features
from tests.conftest import real_signal

TOL = 1e-3

ESC = {"sample_rate": 44100, "clip_seconds": 5.0, "frames": 250}
GTZAN_SHORT = {"sample_rate": 22050, "clip_seconds": 3.0, "frames": 150}  # odd n_fft = 2205


def torch_features(audio: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    return compute_features(torch.from_numpy(np.atleast_2d(audio))[None], cfg)[0].numpy()


@pytest.mark.parametrize("defaults", [ESC, GTZAN_SHORT], ids=["44k-nfft4410", "22k-nfft2205"])
@pytest.mark.parametrize("preset", ["shin2021", "palanisamy2020"])
def test_matches_librosa_htk_no_norm(defaults, preset):
    cfg = resolve_feature_config(defaults, preset)
    x = real_signal(cfg.sample_rate, cfg.clip_seconds, seed=3)
    fb = banded_filterbank(cfg)
    for c in range(3):  # each channel before resizing: the recipe itself
        ours = log_mel(torch.from_numpy(x)[None], cfg, c, fb)[0].numpy()
        ref = librosa_channel(x, cfg, c)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() < TOL
    ours, ref = torch_features(x, cfg), librosa_features(x, cfg)
    assert ours.shape == ref.shape == (3, 128, defaults["frames"])
    assert np.abs(ours - ref).max() < TOL


def test_recipe_constants_for_esc50():
    cfg = resolve_feature_config(ESC)
    assert cfg.fft_size == 4410  # the 100 ms window, for every channel
    assert [cfg.samples(w) for w in cfg.windows_ms] == [1102, 2205, 4410]
    assert [cfg.samples(h) for h in cfg.hops_ms] == [441, 441, 2205]
    assert [cfg.natural_frames(c) for c in range(3)] == [501, 501, 101]


def test_slaney_option_matches_librosa():
    cfg = resolve_feature_config(GTZAN_SHORT, overrides={"mel_scale": "slaney", "mel_norm": "slaney", "n_mels": 64})
    x = real_signal(cfg.sample_rate, cfg.clip_seconds, seed=4)
    assert np.abs(torch_features(x, cfg) - librosa_features(x, cfg)).max() < TOL


def test_htk_differs_from_librosa_defaults():
    """The recipe is HTK without area norm; librosa's defaults (Slaney) are far off, which is
    why the reference must be called with htk=True, norm=None."""
    cfg = resolve_feature_config(GTZAN_SHORT)
    slaney = resolve_feature_config(GTZAN_SHORT, overrides={"mel_scale": "slaney", "mel_norm": "slaney"})
    x = real_signal(cfg.sample_rate, cfg.clip_seconds, seed=5)
    assert np.abs(torch_features(x, cfg) - librosa_features(x, slaney)).max() > 1.0


def test_silence_is_finite():
    cfg = resolve_feature_config(ESC)
    out = torch_features(np.zeros(cfg.clip_samples, dtype=np.float32), cfg)
    assert np.isfinite(out).all()
    assert np.allclose(out, np.log(cfg.log_offset))


def test_batch_equals_single_clips():
    cfg = resolve_feature_config(GTZAN_SHORT)
    clips = np.stack([real_signal(cfg.sample_rate, cfg.clip_seconds, seed=s) for s in range(3)])[:, None]
    batch = compute_features(torch.from_numpy(clips), cfg).numpy()
    for i in range(3):
        assert np.allclose(batch[i], compute_features(torch.from_numpy(clips[i:i + 1]), cfg)[0].numpy(), atol=1e-5)


def test_zhou2019_left_right_mid_channels():
    cfg = resolve_feature_config({"sample_rate": 44100, "clip_seconds": 2.0, "frames": 500}, "zhou2019")
    # 48 kHz, 46.4 / 23.2 ms, the amplitude of each bin (power 1)
    assert (cfg.sample_rate, cfg.fft_size, cfg.samples(cfg.hops_ms[0]), cfg.power) == (48000, 2227, 1114, 1.0)
    stereo = real_signal(cfg.sample_rate, cfg.clip_seconds, seed=6, channels=2).T.copy()  # (2, N)
    ours = torch_features(stereo, cfg)
    assert ours.shape == (3, 128, cfg.natural_frames(0))  # frames=0 keeps the natural count
    mono_cfg = resolve_feature_config({"sample_rate": 48000, "clip_seconds": 2.0, "frames": 0},
                                      overrides={"windows_ms": 46.4, "hops_ms": 23.2, "sources": "mono", "power": 1.0})
    for c, wave in enumerate([stereo[0], stereo[1], stereo.mean(axis=0)]):
        ref = librosa_features(wave, mono_cfg)[0]
        assert np.abs(ours[c] - ref).max() < TOL


def test_lin2022_one_log_mel_stored_once():
    cfg = resolve_feature_config({"sample_rate": 22050, "clip_seconds": 1.0, "frames": 60}, "lin2022")
    assert cfg.shape == (1, 128, 60) and (cfg.sample_rate, cfg.fft_size, cfg.samples(cfg.hops_ms[0])) == (44100, 2048, 561)
    wave = real_signal(cfg.sample_rate, cfg.clip_seconds, seed=8)
    assert np.abs(torch_features(wave[None], cfg) - librosa_features(wave, cfg)).max() < TOL


def test_hornauer2021_bands_of_one_log_power_stft():
    import librosa

    cfg = resolve_feature_config({"sample_rate": 44100, "clip_seconds": 2.0, "frames": 200}, "hornauer2021")
    x = real_signal(cfg.sample_rate, cfg.clip_seconds, seed=7)
    ours = torch_features(x, cfg)
    assert ours.shape == (3, 128, 200)
    spec = np.abs(librosa.stft(x, n_fft=2048, hop_length=561, win_length=1654, window="blackmanharris",
                               center=True, pad_mode="reflect")) ** 2
    logpow = torch.from_numpy(np.log(spec + cfg.log_offset).astype(np.float32))
    edges = [0, 342, 683, 1025]  # 1025 bins in three bands of (almost) equal height
    for c in range(3):
        band = logpow[edges[c]:edges[c + 1]][None]
        ref = torch.nn.functional.interpolate(band[None], size=(128, 200), mode="bilinear", antialias=True,
                                              align_corners=False)[0, 0].numpy()
        assert np.abs(ours[c] - ref).max() < TOL


@pytest.mark.parametrize("defaults", [ESC, GTZAN_SHORT], ids=["nfft4410", "nfft2205"])
def test_cpu_fft_path_matches_torch_stft_path(defaults):
    """The CPU path (scipy pocketfft, window at the frame start) and the GPU path (torch.stft,
    centred window) give the same power spectrum; the GPU path itself runs here on CPU."""
    from audiofx.features.melspec import _stft_cpu, _stft_torch

    cfg = resolve_feature_config(defaults)
    wave = torch.from_numpy(real_signal(cfg.sample_rate, cfg.clip_seconds, seed=8))[None]
    for c in range(3):
        win, hop = cfg.samples(cfg.windows_ms[c]), cfg.samples(cfg.hops_ms[c])
        a = _stft_cpu(wave, cfg.fft_size, hop, win, cfg).abs() ** 2
        b = _stft_torch(wave, cfg.fft_size, hop, win, cfg).abs() ** 2
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(b.max()))


def test_banded_filterbank_equals_the_dense_product():
    """The CPU's banded blocks and the GPU's dense matmul compute the same mel power."""
    cfg = resolve_feature_config(ESC)
    fb = banded_filterbank(cfg)
    squared = torch.rand(2, 40, 2 * (cfg.fft_size // 2 + 1))
    assert torch.allclose(fb(squared), torch.matmul(squared, fb.dense), rtol=1e-4, atol=1e-5)
