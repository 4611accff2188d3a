"""Decoding, resampling, length fixing, and every kind of unusable file."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from audiofx.config import resolve_feature_config
from audiofx.errors import AudioSkip
from audiofx.pipeline.decode import decode_clip, read_audio
from tests.conftest import real_signal

CFG = resolve_feature_config({"sample_rate": 22050, "clip_seconds": 1.0, "frames": 50})


@pytest.mark.parametrize(
    "fmt,subtype,ext",
    [("WAV", "PCM_16", "wav"), ("WAV", "PCM_24", "wav"), ("WAV", "FLOAT", "wav"), ("WAV", "PCM_U8", "wav"),
     ("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg"), ("AU", "PCM_16", "au"), ("AIFF", "PCM_16", "aiff"),
     ("MP3", "MPEG_LAYER_III", "mp3")],
)
def test_formats_decode_to_the_target_rate_and_length(tmp_path, fmt, subtype, ext):
    x = real_signal(44100, 1.5, seed=1)
    path = tmp_path / f"clip.{ext}"
    sf.write(path, x, 44100, format=fmt, subtype=subtype)
    out = decode_clip(path, CFG)
    assert out.shape == (1, CFG.clip_samples) and out.dtype == np.float32
    assert np.isfinite(out).all() and np.abs(out).max() > 0.1


def test_resampling_is_soxr_hq_of_the_mono_mix(tmp_path):
    x = real_signal(48000, 1.0, seed=2, channels=2)
    sf.write(tmp_path / "s.wav", x, 48000, subtype="FLOAT")
    out = decode_clip(tmp_path / "s.wav", CFG)[0]
    ref = soxr.resample(x.mean(axis=1), 48000, 22050, quality="HQ")
    assert np.allclose(out, ref[: CFG.clip_samples], atol=1e-6)


def test_pads_short_and_crops_long(tmp_path):
    sf.write(tmp_path / "short.wav", real_signal(22050, 0.3, seed=3), 22050)
    sf.write(tmp_path / "long.wav", real_signal(22050, 2.5, seed=4), 22050)
    short = decode_clip(tmp_path / "short.wav", CFG)[0]
    assert short.shape == (22050,) and np.all(short[int(0.3 * 22050):] == 0)
    long = decode_clip(tmp_path / "long.wav", CFG)[0]
    assert np.array_equal(long, sf.read(tmp_path / "long.wav", dtype="float32")[0][:22050])


def test_stereo_kept_for_left_right_mid_sources(tmp_path):
    cfg = resolve_feature_config({"sample_rate": 22050, "clip_seconds": 1.0, "frames": 50}, "zhou2019",
                                 {"sample_rate": 22050})
    sf.write(tmp_path / "st.wav", real_signal(22050, 1.0, seed=5, channels=2), 22050)
    sf.write(tmp_path / "mono.wav", real_signal(22050, 1.0, seed=5), 22050)
    assert decode_clip(tmp_path / "st.wav", cfg).shape == (2, 22050)
    mono = decode_clip(tmp_path / "mono.wav", cfg)
    assert mono.shape == (2, 22050) and np.array_equal(mono[0], mono[1])


def test_very_long_file_is_cropped_at_decode(tmp_path):
    sr = 8000
    path = tmp_path / "hour.wav"
    with sf.SoundFile(path, "w", sr, 1, subtype="PCM_16") as f:  # 40 minutes, 38 MB
        block = (0.1 * np.sin(np.arange(sr * 60) / 10)).astype(np.float32)
        for _ in range(40):
            f.write(block)
    tracemalloc.start()
    audio, rate = read_audio(path, max_seconds=1.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rate == sr and audio.shape[1] <= int(1.05 * sr) + 1
    assert peak < 2_000_000  # the 77 MB float32 decode of the whole file never happens


def _wav_bytes(tmp_path: Path) -> bytes:
    sf.write(tmp_path / "ok.wav", real_signal(22050, 1.0, seed=6), 22050, subtype="PCM_16")
    return (tmp_path / "ok.wav").read_bytes()


def _reason(path: Path) -> str:
    with pytest.raises(AudioSkip) as info:
        decode_clip(path, CFG)
    return info.value.reason


def test_unusable_files_raise_skips_with_reasons(tmp_path):
    good = _wav_bytes(tmp_path)
    (tmp_path / "empty.wav").write_bytes(b"")
    assert "empty" in _reason(tmp_path / "empty.wav")
    (tmp_path / "trunc.wav").write_bytes(good[: len(good) // 2])
    assert "truncated" in _reason(tmp_path / "trunc.wav")
    (tmp_path / "text.wav").write_text("this is not audio at all, just text\n" * 10)
    assert "not readable as audio" in _reason(tmp_path / "text.wav")
    (tmp_path / "header.wav").write_bytes(good[:40])
    assert _reason(tmp_path / "header.wav")
    x = real_signal(22050, 1.0, seed=7)
    x[100] = np.nan
    sf.write(tmp_path / "nan.wav", x, 22050, subtype="FLOAT")
    assert "NaN" in _reason(tmp_path / "nan.wav")
    x[100] = np.inf
    sf.write(tmp_path / "inf.wav", x, 22050, subtype="FLOAT")
    assert "infinite" in _reason(tmp_path / "inf.wav")
    sf.write(tmp_path / "au.au", real_signal(22050, 1.0, seed=8), 22050, format="AU", subtype="PCM_16")
    au = (tmp_path / "au.au").read_bytes()
    (tmp_path / "trunc.au").write_bytes(au[: len(au) // 2])
    assert "truncated" in _reason(tmp_path / "trunc.au")
    # what libsndfile calls "System error." (a file it cannot open) gets the OS's reason
    (tmp_path / "folder.wav").mkdir()
    assert "cannot be opened: Is a directory" in _reason(tmp_path / "folder.wav")


def test_silent_clip_is_fine(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(22050, dtype=np.float32), 22050)
    assert np.array_equal(decode_clip(tmp_path / "silent.wav", CFG), np.zeros((1, 22050), dtype=np.float32))
