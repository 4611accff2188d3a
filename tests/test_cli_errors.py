"""Bad input through the real CLI: one line with a hint, non-zero exit, no traceback, and
nothing already written is lost."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zarr

from tests.conftest import (
    assert_one_line_error,
    real_signal,
    run_cli,
    run_process,
)

SMALL = ["--set", "sample_rate=22050", "--set", "clip_seconds=1.0", "--set", "frames=50",
         "--workers", "1", "--no-progress"]


def extract(root: Path, store: Path, *extra: str):
    # A split file decides the folds itself: extract refuses a fold count next to it.
    with_split = any(a == "--split" or a.startswith("split=") for a in extra)
    folds = [] if with_split else ["--set", "folds=2"]
    return run_cli("extract", "--dataset", "folder", "--root", str(root), "--store", str(store), *SMALL, *folds, *extra)


def only_group(store: Path) -> Path:
    groups = [p for p in (store / "folder").iterdir() if p.is_dir()]
    assert len(groups) == 1
    return groups[0]


def test_unknown_dataset_lists_known_ones(tmp_path):
    proc = run_cli("extract", "--dataset", "esc-50", "--store", str(tmp_path))
    assert_one_line_error(proc, "unknown dataset 'esc-50'", "esc50", "urbansound8k", "gtzan", "fsd50k")
    # the in-process runner says what the command line says, exit status included
    real = run_process("extract", "--dataset", "esc-50", "--store", str(tmp_path))
    assert (real.returncode, real.stdout, real.stderr) == (proc.returncode, proc.stdout, proc.stderr)


def test_the_in_process_runner_shows_a_bug_as_a_traceback(monkeypatch):
    from audiofx.pipeline import extract

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(extract, "extract", broken)
    proc = run_cli("extract", "--dataset", "demo", "--no-progress")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError: a bug" in proc.stderr


def test_missing_root_says_layout_and_source(tmp_path):
    proc = run_cli("extract", "--dataset", "esc50", "--root", str(tmp_path / "nowhere"), "--store", str(tmp_path))
    assert_one_line_error(proc, "does not exist", "meta/esc50.csv", "github.com/karolpiczak/ESC-50")


def test_unknown_preset_and_option(tmp_path, small_folder):
    assert_one_line_error(extract(small_folder, tmp_path / "s", "--preset", "shin2022"), "unknown preset", "shin2021")
    assert_one_line_error(extract(small_folder, tmp_path / "s", "--set", "nmels=64"), "unknown option 'nmels'", "n_mels")
    assert_one_line_error(extract(small_folder, tmp_path / "s", "--set", "n_mels=many"), "n_mels must be a number")


def test_missing_files_error_or_allowed_and_recorded(tmp_path, small_folder):
    rows = ["path,label,fold"] + [f"class{c}/class{c}-{i:03d}.wav,c{c},{1 + i % 2}" for c in range(3) for i in range(10)]
    rows += [f"class0/gone-{i}.wav,c0,1" for i in range(5)]
    split = tmp_path / "split.csv"
    split.write_text("\n".join(rows) + "\n")
    line = assert_one_line_error(extract(small_folder, tmp_path / "s", "--split", str(split)),
                                 "5 file(s) listed", "missing", "class0/gone-0.wav", "--allow-missing")
    assert "gone-3" not in line  # the first few, not all
    proc = extract(small_folder, tmp_path / "s", "--split", str(split), "--allow-missing")
    assert proc.returncode == 0, proc.stderr
    assert "missing (allowed): 5" in proc.stdout
    manifest = json.loads((only_group(tmp_path / "s") / "manifest.json").read_text())
    assert manifest["clips"] == 30 and sorted(manifest["missing"]) == [f"class0/gone-{i}.wav" for i in range(5)]


def test_paths_escaping_the_root_are_rejected(tmp_path, small_folder):
    for bad in ("../outside.wav", "/etc/passwd"):
        split = tmp_path / "split.csv"
        split.write_text(f"path,label,fold\nclass0/class0-000.wav,a,1\n{bad},a,2\n")
        assert_one_line_error(extract(small_folder, tmp_path / "s", "--split", str(split)), repr(bad))


def write_bad_files(root: Path) -> dict[str, str]:
    d = root / "class0"
    good = (d / "class0-000.wav").read_bytes()
    (d / "bad-empty.wav").write_bytes(b"")
    (d / "bad-truncated.wav").write_bytes(good[: len(good) // 3])
    (d / "bad-text.wav").write_text("not audio\n" * 50)
    x = real_signal(22050, 1.0, seed=1)
    x[10] = np.nan
    sf.write(d / "bad-nan.wav", x, 22050, subtype="FLOAT")
    sf.write(d / "silent.wav", np.zeros(22050, dtype=np.float32), 22050)
    return {"class0/bad-empty.wav": "empty", "class0/bad-truncated.wav": "truncated",
            "class0/bad-text.wav": "not readable as audio", "class0/bad-nan.wav": "NaN"}


def test_unusable_files_are_skipped_listed_and_recorded(tmp_path, small_folder):
    bad = write_bad_files(small_folder)
    proc = extract(small_folder, tmp_path / "s")
    assert proc.returncode == 0, proc.stderr
    assert "skipped: 4" in proc.stdout and "31 usable of 35" in proc.stdout
    for path, reason in bad.items():
        assert any(path in line and reason in line for line in proc.stdout.splitlines()), (path, proc.stdout)
    group = only_group(tmp_path / "s")
    manifest = json.loads((group / "manifest.json").read_text())
    assert {s["clip"]: s["reason"] for s in manifest["skipped"]}.keys() == bad.keys()
    # skipped rows are masked out; the silent clip is kept with finite features
    for fold in manifest["folds"]:
        g = zarr.open_group(str(group / f"fold-{fold}"), mode="r")
        clips, ok, x = g["clip"][:], g["ok"][:], g["x"][:]
        assert {str(c) for c in clips[~ok]} <= bad.keys()
        assert np.isfinite(x.astype(np.float32)).all()
        if "class0/silent.wav" in set(clips.tolist()):
            i = list(clips).index("class0/silent.wav")
            assert ok[i] and np.allclose(x[i].astype(np.float32), np.log(1e-6), atol=1e-2)


def test_strict_turns_a_skip_into_an_error_and_keeps_written_units(tmp_path, small_folder):
    write_bad_files(small_folder)
    proc = extract(small_folder, tmp_path / "s", "--strict")
    assert_one_line_error(proc, str(small_folder / "class0"), "bad-", "--strict")
    group = only_group(tmp_path / "s")
    assert not (group / "manifest.json").exists()
    kept = sorted(p.name for p in (group / "units").glob("*.json"))
    # Dropping --strict finishes the store; units written before the error are not redone.
    proc = extract(small_folder, tmp_path / "s")
    assert proc.returncode == 0 and (group / "manifest.json").exists()
    if kept:
        assert f"{len(kept)} of" in proc.stdout


def test_changed_dataset_error_then_rebuild(tmp_path, small_folder):
    assert extract(small_folder, tmp_path / "s").returncode == 0
    sf.write(small_folder / "class1" / "class1-004.wav", real_signal(22050, 0.7, seed=5), 22050)
    assert_one_line_error(extract(small_folder, tmp_path / "s"), "different copy of folder", "--rebuild")
    proc = extract(small_folder, tmp_path / "s", "--rebuild")
    assert proc.returncode == 0 and "30 usable of 30" in proc.stdout


def test_fingerprint_content_tells_a_file_edited_in_place(tmp_path, small_folder):
    """A file rewritten with other samples of the same size passes the size fingerprint; the
    content fingerprint (every file's sha256) names it."""
    assert extract(small_folder, tmp_path / "sizes").returncode == 0
    assert extract(small_folder, tmp_path / "content", "--fingerprint", "content").returncode == 0
    manifest = json.loads(next((tmp_path / "content").rglob("manifest.json")).read_text())
    assert len(manifest["fingerprint"]["content"]) == 64
    target = small_folder / "class0" / "class0-001.wav"
    data, rate = sf.read(target, dtype="int16")
    sf.write(target, np.ascontiguousarray(data[::-1]), rate, subtype="PCM_16")  # same size, other samples
    assert "nothing to do" in extract(small_folder, tmp_path / "sizes").stdout  # sizes cannot tell
    unrecorded = extract(small_folder, tmp_path / "sizes", "--fingerprint", "content")
    assert "was made without --fingerprint content" in unrecorded.stderr and unrecorded.returncode == 0
    assert_one_line_error(extract(small_folder, tmp_path / "content", "--fingerprint", "content"),
                          "whose content has changed", "--rebuild")
    assert extract(small_folder, tmp_path / "content", "--fingerprint", "content", "--rebuild").returncode == 0


def test_help_shows_an_example():
    proc = run_cli("extract", "--help")
    assert proc.returncode == 0 and "audiofx extract --dataset esc50 --root" in proc.stdout


def test_the_clis_fixed_choices_are_what_the_stages_accept():
    """The CLI spells its choices out (it imports no stage until a command runs), and so does
    ssl_check; a value added to a stage and not to its option, or the reverse, would be refused
    or crash. The equaliser's band count in --eq-db's help is spelled out too."""
    import click

    from audiofx import cli
    from audiofx.pipeline.extract import FINGERPRINTS
    from audiofx.training.models.augment import EQ_BANDS
    from audiofx.training.models.checkpoints import BRANCHES
    from audiofx.training.models.encoders import HEADS
    from audiofx.training.stages.evaluate import BN_STATS, SPACES
    from audiofx.training.stages.probe import PROBES
    from benchmarks import ssl_check

    def choices(command: str, option: str) -> tuple[str, ...]:
        param = next(p for p in cli.cli.commands[command].params if p.name == option)
        assert isinstance(param.type, click.Choice), (command, option)
        return tuple(param.type.choices)

    assert choices("extract", "fingerprint") == FINGERPRINTS
    assert choices("finetune", "head") == HEADS
    assert choices("finetune", "init_branch") == choices("evaluate", "init_branch") == BRANCHES
    assert choices("evaluate", "space") == SPACES
    assert choices("evaluate", "bn_stats") == BN_STATS
    bn_stats = next(a for a in ssl_check.parser()._actions if a.dest == "bn_stats")  # the benchmark's spelling
    assert tuple(bn_stats.choices) == BN_STATS
    assert choices("evaluate", "probe") == PROBES
    eq_db = next(p for p in cli.cli.commands["pretrain"].params if p.name == "eq_db")
    assert f"({EQ_BANDS} bands over the bins" in eq_db.help  # the equaliser the help describes


def test_ssl_check_refuses_a_negative_count_before_it_extracts(capsys):
    """ssl_check builds the stages' configs itself; a negative mask count or seed count is
    refused as its arguments are read, not minutes later by the pretrain stage."""
    from benchmarks import ssl_check

    for args, needle in ((["--freq-masks", "-1"], "argument --freq-masks: must be at least 0, got -1"),
                         (["--seeds", "0"], "argument --seeds: must be at least 1, got 0")):
        with pytest.raises(SystemExit):
            ssl_check.parser().parse_args(args)
        assert needle in capsys.readouterr().err
    assert ssl_check.parser().parse_args(["--freq-masks", "0"]).freq_masks == 0


def test_ssl_check_refuses_a_pool_of_its_own_set_or_an_unknown_one(capsys):
    """--pool-with names the other sets whose clips join the pretraining pool: the evaluated
    set itself (its clips twice) or a set that does not exist is refused before any extraction."""
    from benchmarks import ssl_check

    for given in (["--set", "mridangam", "--pool-with", "mridangam"], ["--pool-with", "speech,drums"]):
        with pytest.raises(SystemExit):
            ssl_check.main(given)
        assert "--pool-with" in capsys.readouterr().err


def test_ssl_check_pools_each_sets_clips_with_its_own_grouped_folds(tmp_path, monkeypatch):
    """The pretraining pool is one folder dataset: every clip of each set once, reached through
    a link to the set's folder, its label prefixed by the set, and each group (speaker, tuning)
    in one fold."""
    from benchmarks import ssl_check

    realdev = tmp_path / "realdev"
    sizes = {"words": {"s1": 3, "s2": 2, "s3": 1}, "drums": {"b": 2, "c": 2}}
    for name, groups in sizes.items():
        (realdev / name / "x").mkdir(parents=True)
        rows = ["path,label,group"]
        for g, n in groups.items():
            for i in range(n):
                (realdev / name / "x" / f"{g}-{i}.wav").write_bytes(b"")
                rows.append(f"x/{g}-{i}.wav,{'ab'[i % 2]},{g}")
        (realdev / name / "labels.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(ssl_check, "REALDEV", realdev)
    monkeypatch.setattr(ssl_check, "SETS", {n: (n, "label", "group", "group") for n in sizes})

    split = ssl_check.pooled_split(["drums", "words"], tmp_path / "work" / "pool")
    rows = list(csv.DictReader(open(split)))
    assert len(rows) == 10 and len({r["path"] for r in rows}) == 10
    assert all((tmp_path / "work" / "pool" / r["path"]).is_file() for r in rows)  # through the links
    assert {r["label"] for r in rows} == {"drums:a", "drums:b", "words:a", "words:b"}
    fold_of_group = {}
    for r in rows:
        fold_of_group.setdefault(r["path"].rsplit("-", 1)[0], set()).add(r["fold"])
    assert all(len(f) == 1 for f in fold_of_group.values()) and len(fold_of_group) == 5


def test_cache_commands(tmp_path, small_folder):
    assert extract(small_folder, tmp_path / "s").returncode == 0
    key = only_group(tmp_path / "s").name
    ls = run_cli("cache", "ls", "--store", str(tmp_path / "s"))
    assert ls.returncode == 0
    header, row = ls.stdout.splitlines()
    assert header.split() == ["dataset", "key", "folds", "clips", "size", "created", "status"]
    assert row.split()[:4] == ["folder", key, "2", "30"] and row.split()[-1] == "complete"
    info = run_cli("cache", "info", key[:6], "--store", str(tmp_path / "s"))
    assert info.returncode == 0 and "fold 1: 15 clips" in info.stdout and "n_mels=128" in info.stdout
    assert run_cli("cache", "verify", "--store", str(tmp_path / "s")).stdout.strip() == f"ok folder/{key}"
    chunk = only_group(tmp_path / "s") / "fold-1" / "x" / "c" / "0" / "0" / "0" / "0"
    chunk.write_bytes(b"garbage")
    bad = run_cli("cache", "verify", key, "--store", str(tmp_path / "s"))
    assert bad.returncode != 0 and f"DAMAGED folder/{key}/fold-1/x chunk 0 (clips 0-14): unreadable" in bad.stdout
    assert_one_line_error(bad, "1 of 1 feature sets are damaged")
    assert_one_line_error(run_cli("cache", "info", "zzzz", "--store", str(tmp_path / "s")), "no feature set 'zzzz'")


def test_folds_of_skipped_clips_only_are_refused_before_training(tmp_path, small_folder):
    # Fold 3 holds only unreadable files: every stage must say so up front, in both data
    # modes, instead of training on nothing (NaN statistics, an empty torch.cat).
    import torch

    from audiofx.training.models.encoders import build_encoder

    (small_folder / "bad").mkdir()
    rows = [f"class{c}/class{c}-{i:03d}.wav,c{c},{1 + i % 2}" for c in range(3) for i in range(10)]
    for c in range(3):
        (small_folder / "bad" / f"b{c}.wav").write_text("not audio\n")
        rows.append(f"bad/b{c}.wav,c{c},3")
    split = tmp_path / "split.csv"
    split.write_text("path,label,fold\n" + "\n".join(rows) + "\n")
    store, runs = str(tmp_path / "s"), tmp_path / "runs"
    proc = extract(small_folder, tmp_path / "s", "--set", f"split={split}")
    assert proc.returncode == 0 and "30 usable of 33" in proc.stdout, proc.stdout + proc.stderr
    encoder = tmp_path / "encoder.pt"
    torch.save({"states": {"encoder": build_encoder("tiny").state_dict()}, "meta": {"arch": "tiny"}}, encoder)
    common = ["--dataset", "folder", "--store", store, "--runs", str(runs), "--fold", "all"]
    for budget in ([], ["--memory-budget", "0"]):
        finetune = run_cli("finetune", *common, "--init", "scratch", "--epochs", "1", "--arch", "tiny", *budget)
        assert_one_line_error(finetune, "no usable clip in its test fold 3: all 3 were skipped", "--fold K")
        evaluate = run_cli("evaluate", *common, "--run", str(encoder), "--mode", "knn", *budget)
        assert_one_line_error(evaluate, "no usable clip in its test fold 3", "extract again")
    assert not runs.exists()  # refused before any run folder is made
    # A pretraining pool of a set with no usable clip at all
    bad_only = small_folder.parent / "bad-only"
    (bad_only / "a").mkdir(parents=True)
    for i in range(3):
        (bad_only / "a" / f"{i}.wav").write_text("not audio\n")
    assert extract(bad_only, tmp_path / "bad-store").returncode == 0
    pretrain = run_cli("pretrain", "--method", "simclr", "--datasets", "folder", "--store", str(tmp_path / "bad-store"),
                       "--runs", str(runs), "--epochs", "1", "--arch", "tiny")
    assert_one_line_error(pretrain, "folder", "has no usable clip: all 3 were skipped", "--datasets")
    default_pool = run_cli("pretrain", "--method", "simclr", "--store", str(tmp_path / "bad-store"), "--runs", str(runs),
                           "--epochs", "1", "--arch", "tiny")
    assert_one_line_error(default_pool, "no complete shin2021 features with usable clips")
