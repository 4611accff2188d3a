"""Tiny copies of every dataset's official layout, with real audio files, for tests.

Each builder writes under ``root`` and returns it. The audio is real (decodable, at the
dataset's own rates, channel counts and bit depths) but short (0.3-0.5 s), since extraction
pads or crops to the clip length anyway. Signals are deterministic: tones plus seeded noise.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import soundfile as sf

__all__ = [
    "tone",
    "write_audio",
    "ESC50_CATEGORIES",
    "US8K_CLASSES",
    "US8K_FORMATS",
    "GTZAN_GENRES",
    "DCASE2013_SCENES",
    "FSD50K_VOCABULARY",
    "make_esc50",
    "make_urbansound8k",
    "make_gtzan",
    "make_dcase2013",
    "make_tut",
    "make_fsd50k",
    "make_folder",
]


def tone(sr: int, seconds: float, freq: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A sine at freq with a little seeded noise, float32; shape (n,) mono or (n, channels).

    Each channel is slightly detuned so stereo files are not two identical channels.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(sr * seconds))) / sr
    chans = [
        0.4 * np.sin(2 * np.pi * freq * (1 + 0.01 * c) * t + c) + 0.02 * rng.standard_normal(t.size)
        for c in range(channels)
    ]
    out = np.stack(chans, axis=1).astype(np.float32)
    return out[:, 0] if channels == 1 else out


def write_audio(path: Path, data: np.ndarray, sr: int, subtype: str = "PCM_16", format: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sr, subtype=subtype, format=format)
    return path


def _write_csv(path: Path, header: Sequence[str] | None, rows: Iterable[Sequence], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


# -- ESC-50 -------------------------------------------------------------------------------

# (target, category, esc10) as in the real esc50.csv. The default subset has gaps in the
# targets (2, 10, 41) and a non-ESC-10 class, so both adapters must re-index labels.
ESC50_CATEGORIES = [(0, "dog", True), (1, "rooster", True), (2, "pig", False), (10, "rain", True), (41, "chainsaw", True)]


def make_esc50(
    root: Path,
    per_class: int = 5,
    categories: Sequence[tuple[int, str, bool]] = ESC50_CATEGORIES,
    seconds: float = 0.5,
) -> Path:
    """ESC-50: audio/<fold>-<src_file>-<take>-<target>.wav (44.1 kHz mono 16-bit) and
    meta/esc50.csv; per_class clips per class spread over folds 1..5 (5 = one per fold)."""
    root = Path(root)
    rows = []
    for target, category, esc10 in categories:
        for i in range(per_class):
            fold = i % 5 + 1
            src = 100000 + 137 * target + i
            filename = f"{fold}-{src}-A-{target}.wav"
            write_audio(root / "audio" / filename, tone(44100, seconds, 200 + 40 * target + 10 * i, seed=src), 44100)
            rows.append([filename, fold, target, category, str(esc10), src, "A"])
    _write_csv(root / "meta/esc50.csv", ["filename", "fold", "target", "category", "esc10", "src_file", "take"], rows)
    return root


# -- UrbanSound8K ---------------------------------------------------------------------------

US8K_CLASSES = [
    "air_conditioner", "car_horn", "children_playing", "dog_bark", "drilling",
    "engine_idling", "gun_shot", "jackhammer", "siren", "street_music",
]
# (sample rate, channels, subtype): the mix of the real dataset, 8-bit unsigned to float.
US8K_FORMATS = [
    (44100, 2, "PCM_16"), (48000, 2, "PCM_24"), (96000, 2, "PCM_24"), (22050, 1, "PCM_16"),
    (8000, 1, "PCM_U8"), (44100, 1, "FLOAT"), (11025, 1, "PCM_16"), (48000, 1, "PCM_16"),
    (16000, 2, "PCM_U8"), (96000, 1, "FLOAT"),
]


def make_urbansound8k(root: Path, per_fold: int = 2) -> Path:
    """UrbanSound8K: audio/fold1..fold10/<fsID>-<classID>-<occ>-<slice>.wav and
    metadata/UrbanSound8K.csv; per_fold clips in each of the 10 folds, all 10 classes used,
    formats cycling through US8K_FORMATS, durations 0.3-0.7 s."""
    root = Path(root)
    rows = []
    n = 0
    for fold in range(1, 11):
        for j in range(per_fold):
            class_id = n % 10
            sr, channels, subtype = US8K_FORMATS[n % len(US8K_FORMATS)]
            fs_id = 7000 + 31 * n
            name = f"{fs_id}-{class_id}-0-{j}.wav"
            seconds = 0.3 + 0.1 * (n % 5)
            write_audio(root / f"audio/fold{fold}" / name, tone(sr, seconds, 300 + 50 * class_id, channels, seed=n), sr, subtype)
            rows.append([name, fs_id, 0.0, seconds, 1 + n % 2, fold, class_id, US8K_CLASSES[class_id]])
            n += 1
    header = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
    _write_csv(root / "metadata/UrbanSound8K.csv", header, rows)
    return root


# -- GTZAN -------------------------------------------------------------------------------

GTZAN_GENRES = ["blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock"]


def make_gtzan(
    root: Path,
    ext: str = ".au",
    per_genre: int = 10,
    genres: Sequence[str] = ("blues", "classical", "jazz"),
    broken: bool = False,
    seconds: float = 0.3,
) -> Path:
    """GTZAN: genres/<genre>/<genre>.000NN<ext>, 22050 Hz mono 16-bit (.au is big-endian
    Sun audio, as in the original release). broken=True adds an unreadable
    genres/jazz/jazz.00054<ext>, like the real release's corrupt file."""
    root = Path(root)
    fmt = "AU" if ext.lower() in (".au", ".snd") else None
    for g, genre in enumerate(genres):
        for i in range(per_genre):
            audio = tone(22050, seconds, 110 * (g + 1) + 7 * i, seed=100 * g + i)
            write_audio(root / "genres" / genre / f"{genre}.{i:05d}{ext}", audio, 22050, "PCM_16", fmt)
    if broken:
        bad = root / "genres" / "jazz" / f"jazz.00054{ext}"
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_bytes(b".snd\x00\x00" + bytes(range(64)))  # a truncated, nonsensical header
    return root


# -- DCASE 2013 ---------------------------------------------------------------------------

DCASE2013_SCENES = [
    "bus", "busystreet", "office", "openairmarket", "park",
    "quietstreet", "restaurant", "supermarket", "tube", "tubestation",
]


def make_dcase2013(
    root: Path, per_scene: int = 10, scenes: Sequence[str] = DCASE2013_SCENES, subdir: str = "", seconds: float = 0.3
) -> Path:
    """DCASE 2013 scenes: <scene><NN>.wav (44.1 kHz stereo 16-bit) directly in root, or in
    root/<subdir> (e.g. subdir="audio")."""
    root = Path(root)
    folder = root / subdir if subdir else root
    for s, scene in enumerate(scenes):
        for i in range(1, per_scene + 1):
            write_audio(folder / f"{scene}{i:02d}.wav", tone(44100, seconds, 150 + 60 * s + 5 * i, 2, seed=s * 100 + i), 44100)
    return root


# -- TUT 2018 / TAU 2019 ------------------------------------------------------------------


def make_tut(root: Path, evaluate_header: str = "full", seconds: float = 0.3) -> Path:
    """TUT 2018 / TAU 2019 development layout: audio/<scene>-<city>-<loc>-<seg>-a.wav
    (48 kHz stereo 24-bit), tab-separated meta.csv, evaluation_setup/fold1_{train,evaluate}.csv.

    3 scenes x 3 cities x 2 segments = 18 files: barcelona -> train, helsinki -> evaluate,
    lyon -> in neither setup file (6 of the 18 segments, left out of the index).
    evaluate_header: "full" (filename, scene_label), "filename" (filename only) or "none".
    """
    root = Path(root)
    meta, train, evaluate = [], [], []
    for s, scene in enumerate(["airport", "metro_station", "park"]):
        for c, city in enumerate(["barcelona", "helsinki", "lyon"]):
            for seg in range(2):
                name = f"audio/{scene}-{city}-{c}-{seg}-a.wav"
                write_audio(root / name, tone(48000, seconds, 200 + 100 * s + 10 * c + seg, 2, seed=s * 10 + c), 48000, "PCM_24")
                meta.append([name, scene, f"{city}-{c}", "a"])
                if city == "barcelona":
                    train.append([name, scene])
                elif city == "helsinki":
                    evaluate.append([name, scene])
    _write_csv(root / "meta.csv", ["filename", "scene_label", "identifier", "source_label"], meta, "\t")
    _write_csv(root / "evaluation_setup/fold1_train.csv", ["filename", "scene_label"], train, "\t")
    if evaluate_header == "full":
        _write_csv(root / "evaluation_setup/fold1_evaluate.csv", ["filename", "scene_label"], evaluate, "\t")
    elif evaluate_header == "filename":
        _write_csv(root / "evaluation_setup/fold1_evaluate.csv", ["filename"], [r[:1] for r in evaluate], "\t")
    elif evaluate_header == "none":
        _write_csv(root / "evaluation_setup/fold1_evaluate.csv", None, evaluate, "\t")
    else:
        raise ValueError(f"evaluate_header must be full, filename or none, not {evaluate_header!r}")
    return root


# -- FSD50K ------------------------------------------------------------------------------

# (label, mid) in the official vocabulary's order for this subset (not alphabetical).
FSD50K_VOCABULARY = [
    ("Music", "/m/04rlf"), ("Guitar", "/m/0342h"), ("Electric_guitar", "/m/02sgy"),
    ("Dog", "/m/0bt9lr"), ("Bark", "/m/05tny_"), ("Animal", "/m/0jbk"),
]
_FSD50K_DEV = [  # fname, labels, split
    ("64760", ["Electric_guitar", "Guitar", "Music"], "train"),
    ("16399", ["Bark", "Dog", "Animal"], "train"),
    ("16401", ["Bark", "Dog", "Animal"], "val"),
    ("382455", ["Music"], "train"),
    ("257306", ["Guitar", "Music"], "val"),
]
_FSD50K_EVAL = [
    ("37199", ["Electric_guitar", "Guitar", "Music"]),
    ("175151", ["Dog", "Animal"]),
]


def make_fsd50k(root: Path, vocabulary: bool = False, seconds: float = 0.3) -> Path:
    """FSD50K: FSD50K.{dev,eval}_audio/<fname>.wav (44.1 kHz mono 16-bit) and
    FSD50K.ground_truth/dev.csv (5 clips: 3 train, 2 val), eval.csv (2 clips); labels are
    quoted comma lists. vocabulary=True also writes the headerless vocabulary.csv whose order
    (FSD50K_VOCABULARY) differs from alphabetical."""
    root = Path(root)
    mid = dict(FSD50K_VOCABULARY)
    gt = root / "FSD50K.ground_truth"
    dev_rows, eval_rows = [], []
    for i, (fname, labels, split) in enumerate(_FSD50K_DEV):
        write_audio(root / "FSD50K.dev_audio" / f"{fname}.wav", tone(44100, seconds, 300 + 30 * i, seed=i), 44100)
        dev_rows.append([fname, ",".join(labels), ",".join(mid[n] for n in labels), split])
    for i, (fname, labels) in enumerate(_FSD50K_EVAL):
        write_audio(root / "FSD50K.eval_audio" / f"{fname}.wav", tone(44100, seconds, 500 + 30 * i, seed=50 + i), 44100)
        eval_rows.append([fname, ",".join(labels), ",".join(mid[n] for n in labels)])
    _write_csv(gt / "dev.csv", ["fname", "labels", "mids", "split"], dev_rows)
    _write_csv(gt / "eval.csv", ["fname", "labels", "mids"], eval_rows)
    if vocabulary:
        _write_csv(gt / "vocabulary.csv", None, [[i, n, m] for i, (n, m) in enumerate(FSD50K_VOCABULARY)])
    return root


# -- folder ------------------------------------------------------------------------------

# Extension -> (soundfile format, subtype); upper-case ".WAV" checks case-insensitive matching.
_FOLDER_FORMATS = [(".wav", "WAV", "PCM_16"), (".flac", "FLAC", "PCM_16"), (".ogg", "OGG", "VORBIS"), (".WAV", "WAV", "PCM_24")]


def make_folder(
    root: Path, classes: Sequence[str] = ("bird", "cat", "dog"), per_class: int = 5, seconds: float = 0.3
) -> Path:
    """Your-own-audio layout: <root>/<class>/..., per_class files each, mixing WAV, FLAC, OGG
    and an upper-case .WAV, the last file of every class one folder deeper (<class>/more/).
    Also writes files that must be ignored: <class>/notes.txt, a macOS ._ resource fork,
    an audio file directly in root, and an empty subfolder."""
    root = Path(root)
    for c, name in enumerate(classes):
        for i in range(per_class):
            ext, fmt, subtype = _FOLDER_FORMATS[i % len(_FOLDER_FORMATS)]
            sub = "more/" if i == per_class - 1 else ""
            sr = (22050, 44100, 16000)[i % 3]
            write_audio(root / name / f"{sub}{name}_{i:02d}{ext}", tone(sr, seconds, 250 + 120 * c + 9 * i, seed=c * 10 + i), sr, subtype, fmt)
        (root / name / "notes.txt").write_text("not audio\n")
        (root / name / f"._{name}_00.wav").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_audio(root / "stray.wav", tone(22050, seconds, 440), 22050)
    (root / "empty").mkdir(exist_ok=True)
    return root


def make_fsd50k_learnable(root: Path, per_split: tuple[int, int, int] = (48, 16, 24), classes: int = 4,
                          seconds: float = 1.0, sr: int = 22050, seed: int = 0) -> Path:
    """An FSD50K-layout set whose labels can be learnt: class c is a tone at its own frequency,
    and every clip (train / val / eval counts in ``per_split``) mixes the tones of its one or
    two classes with seeded noise. Class names are ``class-<c>``; no vocabulary.csv (classes
    sort alphabetically). Written at ``sr`` (no resampling at the FSD50K default rate)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    freqs = [300.0 * 2.2 ** c for c in range(classes)]
    t = np.arange(int(round(sr * seconds))) / sr
    gt = root / "FSD50K.ground_truth"
    rows: dict[str, list] = {"dev": [], "eval": []}
    fname = 1000
    for split, count in zip(("train", "val", "eval"), per_split):
        for _ in range(count):
            labels = sorted(rng.choice(classes, size=int(rng.integers(1, 3)), replace=False).tolist())
            audio = 0.02 * rng.standard_normal(t.size)
            for c in labels:
                audio += rng.uniform(0.2, 0.4) * np.sin(2 * np.pi * freqs[c] * t + rng.uniform(0, 6.3))
            part = "eval" if split == "eval" else "dev"
            write_audio(root / f"FSD50K.{part}_audio" / f"{fname}.wav", audio.astype(np.float32), sr)
            names = ",".join(f"class-{c}" for c in labels)
            mids = ",".join(f"/m/{c:04d}" for c in labels)
            rows[part].append([fname, names, mids, split] if part == "dev" else [fname, names, mids])
            fname += 1
    _write_csv(gt / "dev.csv", ["fname", "labels", "mids", "split"], rows["dev"])
    _write_csv(gt / "eval.csv", ["fname", "labels", "mids"], rows["eval"])
    return root
