"""Tiny datasets in each official layout, with real audio files written by soundfile at the
real sample rates, channel counts and bit depths (but short, so tests stay fast)."""

from __future__ import annotations

import csv
from pathlib import Path

import soundfile as sf

from tests.conftest import real_signal


def _wav(path: Path, sr: int, seconds: float, seed: int, channels: int = 1, subtype: str = "PCM_16",
         fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = real_signal(sr, seconds, seed, channels=channels)
    sf.write(path, x, sr, subtype=subtype, format=fmt)


def make_esc50(root: Path, classes: int = 3, per_fold: int = 1) -> Path:
    """ESC-50: audio/*.wav (44.1 kHz mono 16-bit) and meta/esc50.csv. Targets 0..classes-1;
    even targets are ESC-10 classes. Rows are listed in filename order as in the release."""
    rows = []
    for target in range(classes):
        for fold in range(1, 6):
            for take in range(per_fold):
                name = f"{fold}-{100 + target}{take}-A-{target}.wav"
                _wav(root / "audio" / name, 44100, 0.5, seed=100 * target + 10 * fold + take)
                rows.append([name, fold, target, f"class_{target:02d}", str(target % 2 == 0), f"{100 + target}", "A"])
    (root / "meta").mkdir(parents=True, exist_ok=True)
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        w.writerows(sorted(rows))
    return root


# UrbanSound8K files vary: rate, channels and sample format, as in the release.
US8K_FORMATS = [(8000, 1, "PCM_U8"), (22050, 2, "PCM_16"), (44100, 1, "PCM_24"), (48000, 2, "FLOAT"),
                (96000, 1, "PCM_16"), (11025, 1, "PCM_16"), (16000, 2, "PCM_24"), (32000, 1, "FLOAT"),
                (44100, 2, "PCM_16"), (24000, 1, "PCM_U8")]


def make_urbansound8k(root: Path, classes: int = 2) -> Path:
    rows = []
    for fold in range(1, 11):
        for cls in range(classes):
            sr, ch, subtype = US8K_FORMATS[(fold + cls) % len(US8K_FORMATS)]
            name = f"{1000 + fold}-{cls}-0-0.wav"
            _wav(root / "audio" / f"fold{fold}" / name, sr, 0.3 + 0.05 * cls, seed=fold * 10 + cls, channels=ch,
                 subtype=subtype)
            rows.append([name, 1000 + fold, 0.0, 0.3, 1, fold, cls, f"sound_{cls}"])
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    with open(root / "metadata" / "UrbanSound8K.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"])
        w.writerows(rows)
    return root


GENRES = ["blues", "classical", "jazz"]


def make_gtzan(root: Path, per_genre: int = 10, ext: str = ".au", broken_jazz_00054: bool = True) -> Path:
    """genres/<genre>/<genre>.000NN.au at 22.05 kHz 16-bit; jazz.00054 unreadable as in the release."""
    for g, genre in enumerate(GENRES):
        for i in range(per_genre):
            path = root / "genres" / genre / f"{genre}.{i:05d}{ext}"
            _wav(path, 22050, 0.5, seed=1000 + 100 * g + i, fmt="AU" if ext == ".au" else None)
    if broken_jazz_00054:
        bad = root / "genres" / "jazz" / f"jazz.00054{ext}"
        good = (root / "genres" / "jazz" / f"jazz.00000{ext}").read_bytes()
        bad.write_bytes(good[:24] + b"\x00" * 7)  # a header and nothing decodable
    return root


def make_dcase2013(root: Path, scenes: tuple[str, ...] = ("bus", "park", "quietstreet"), per_scene: int = 5) -> Path:
    for s, scene in enumerate(scenes):
        for i in range(1, per_scene + 1):
            _wav(root / f"{scene}{i:02d}.wav", 44100, 0.5, seed=2000 + 10 * s + i, channels=2)
    return root


def make_tut(root: Path, scenes: tuple[str, ...] = ("airport", "metro", "park"), per_scene: int = 3) -> Path:
    """meta.csv and evaluation_setup/fold1_{train,evaluate}.csv (tab-separated), 48 kHz stereo.
    The last segment of each scene is in neither setup file, as TAU 2019 leaves some out."""
    meta, train, evaluate = [], [], []
    for s, scene in enumerate(scenes):
        for i in range(per_scene + 1):
            name = f"audio/{scene}-barcelona-{i}-0-a.wav"
            _wav(root / name, 48000, 0.4, seed=3000 + 10 * s + i, channels=2)
            meta.append([name, scene, f"barcelona-{i}", "a"])
            if i < per_scene - 1:
                train.append([name, scene])
            elif i == per_scene - 1:
                evaluate.append([name])
    (root / "evaluation_setup").mkdir(parents=True, exist_ok=True)
    for path, header, rows in [(root / "meta.csv", ["filename", "scene_label", "identifier", "source_label"], meta),
                               (root / "evaluation_setup" / "fold1_train.csv", ["filename", "scene_label"], train),
                               (root / "evaluation_setup" / "fold1_evaluate.csv", ["filename"], evaluate)]:
        with open(path, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(header)
            w.writerows(rows)
    return root


def make_fsd50k(root: Path) -> Path:
    """Dev (train/val) and eval clips of 0.3-1.2 s, with multi-label ground truth."""
    dev = [("101", "Bark,Dog,Animal", "train"), ("102", "Guitar,Music", "train"), ("103", "Dog,Animal", "val"),
           ("104", "Music", "train")]
    ev = [("201", "Bark,Dog,Animal"), ("202", "Guitar,Music")]
    for i, (fname, _, _) in enumerate(dev):
        _wav(root / "FSD50K.dev_audio" / f"{fname}.wav", 44100, 0.3 + 0.3 * i, seed=4000 + i)
    for i, (fname, _) in enumerate(ev):
        _wav(root / "FSD50K.eval_audio" / f"{fname}.wav", 44100, 0.5, seed=4100 + i)
    gt = root / "FSD50K.ground_truth"
    gt.mkdir(parents=True, exist_ok=True)
    with open(gt / "dev.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fname", "labels", "mids", "split"])
        w.writerows([(n, labels, ",".join(f"/m/{x}" for x in labels.split(",")), split) for n, labels, split in dev])
    with open(gt / "eval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fname", "labels", "mids"])
        w.writerows([(n, labels, ",".join(f"/m/{x}" for x in labels.split(","))) for n, labels in ev])
    return root


def make_mixed_folder(root: Path, per_class: int = 5) -> Path:
    """`folder` layout with WAV, FLAC, OGG and AIFF files, one subfolder per class."""
    formats = [(".wav", "WAV", "PCM_16"), (".flac", "FLAC", "PCM_16"), (".ogg", "OGG", "VORBIS"),
               (".aiff", "AIFF", "PCM_16")]
    for c, name in enumerate(["dog", "rain"]):
        for i in range(per_class):
            ext, fmt, subtype = formats[i % len(formats)]
            _wav(root / name / f"{name}{i}{ext}", 22050, 0.5, seed=5000 + 10 * c + i, subtype=subtype, fmt=fmt)
    return root
