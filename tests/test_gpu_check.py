"""benchmarks/gpu_check.py, the GPU machine's one prepared command, runs end to end: its
smoke run on CPU goes through every section (parity, extraction, training steps, the NPID
epoch, the CLI stages) and reports each figure, so the scarce GPU minutes are not spent
finding a typo."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check
from audiofx.pipeline.reading import load_fold
from audiofx.pipeline.store import FeatureStore, present_folds


def test_smoke_run_reports_every_section(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    assert gpu_check.main(["--smoke", "--esc-clips", "10", "--gtzan-clips", "10", "--workers", "1",
                           "--work", str(work), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "gpu-check.json").read_text())

    assert report["smoke"] and report["device"] == "cpu"
    for section in ("f. machine", "a. parity esc-like", "a. parity gtzan-like", "b. extract esc-like",
                    "b. extract gtzan-like", "c. fine-tune", "data stall", "d. NPID epoch", "e. audiofx finetune",
                    "e. audiofx pretrain"):
        assert section in printed, section
    assert (out / "gpu-check.txt").read_text().strip() == printed.strip()

    # CPU against CPU: the same computation, so exactly equal; the values are real log-mels
    for p in report["parity"].values():
        assert p["max_abs"] == 0.0 and p["value_range"][1] > p["value_range"][0]
    # every generated clip (copies included) was extracted into the measured store
    for name, e in report["extraction"].items():
        assert e["clips"] == 10 and e["cpu"]["clips_s"] > 0
        store = FeatureStore(work / "stores" / f"{name}-cpu")
        ((dataset, key, _),) = store.groups()
        folds = present_folds(store.read_manifest(dataset, key))
        assert sum(len(load_fold(store, dataset, key, f)[2]) for f in folds) == 10
    t = report["training"]
    assert t["npid_clips"] == 16 and t["npid_epoch_s"] > 0
    assert min(t["in_memory_steps_s"], t["streaming_steps_s"], t["resident_steps_s"]) > 0
    for stage in ("finetune", "pretrain"):
        c = report["cli"][stage]
        assert c["rc"] == 0, c["error"]
        assert c["epochs_logged"] == 2, f"{stage} logged {c['epochs_logged']} epochs, not 2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the full check would run")
def test_without_cuda_it_refuses_in_one_line(capsys):
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--smoke" in err
