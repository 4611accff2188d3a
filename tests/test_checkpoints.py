"""--init PATH reads the checkpoint layouts in common use: each layout is built here from a
seeded random torchvision network, saved under that layout's keys and nesting, and must load
tensor for tensor; the heads, queues and second networks beside it are dropped by rule; bad
files get one line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from audiofx.errors import ConfigError
from audiofx.training.models.checkpoints import RESNET_CHILDREN
from audiofx.training.stages.weights import resolve_init
from tests.conftest import run_cli


def _resnet(arch: str, seed: int) -> torchvision.models.ResNet:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():  # BatchNorm statistics off their defaults, so a missed buffer shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(seed + 7)
    return model


def _state(arch: str = "resnet18", seed: int = 0) -> dict[str, torch.Tensor]:
    return _resnet(arch, seed).state_dict()


def _backbone(sd):  # what audiofx must load: everything but the classifier
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _under(prefix: str, sd) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def _mlp(prefix: str, dim: int = 512) -> dict[str, torch.Tensor]:
    return {f"{prefix}0.weight": torch.randn(dim, dim), f"{prefix}0.bias": torch.randn(dim),
            f"{prefix}2.weight": torch.randn(128, dim), f"{prefix}2.bias": torch.randn(128)}


def _sequential(sd) -> dict[str, torch.Tensor]:
    """torchvision names as nn.Sequential(*children) numbers them (lightly's backbones)."""
    out = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head in RESNET_CHILDREN:
            out[f"{RESNET_CHILDREN.index(head)}.{rest}"] = v
    return out


ONLINE, MOMENTUM = _state(seed=0), _state(seed=1)
OPTIMIZER = {"state": {0: {"momentum_buffer": torch.randn(3)}}, "param_groups": [{"lr": 0.03, "params": [0]}]}
# layout -> (checkpoint, the torchvision state its backbone must equal, words the layout's name holds)
LAYOUTS = {
    "torchvision": (ONLINE, ONLINE, "torchvision / timm state dict"),
    "torchvision, no BatchNorm counters": ({k: v for k, v in ONLINE.items() if "num_batches" not in k}, None,
                                           "torchvision / timm"),
    "timm training checkpoint": ({"epoch": 3, "arch": "resnet18", "version": 2, "state_dict": ONLINE,
                                  "state_dict_ema": MOMENTUM, "args": argparse.Namespace(lr=0.1, model="resnet18"),
                                  "metric": np.float64(71.2), "optimizer": OPTIMIZER}, ONLINE,
                                 "timm training checkpoint"),
    "MoCo v1/v2": ({"epoch": 200, "arch": "resnet18", "optimizer": OPTIMIZER, "state_dict": {
        **_under("module.encoder_q.", _backbone(ONLINE)), **_mlp("module.encoder_q.fc."),
        **_under("module.encoder_k.", _backbone(MOMENTUM)), **_mlp("module.encoder_k.fc."),
        "module.queue": torch.randn(128, 4096), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}}, ONLINE,
        "MoCo v1/v2, online network (state_dict/module.encoder_q.*)"),
    "MoCo v3": ({"epoch": 100, "arch": "resnet18", "scaler": {"scale": 1024.0}, "state_dict": {
        **_under("module.base_encoder.", _backbone(ONLINE)), **_mlp("module.base_encoder.fc."),
        **_under("module.momentum_encoder.", _backbone(MOMENTUM)), **_mlp("module.momentum_encoder.fc."),
        **_mlp("module.predictor.", 128)}}, ONLINE, "MoCo v3, online network"),
    "SimCLR v1 converted": ({"state_dict": ONLINE}, ONLINE, "state dict under 'state_dict'"),
    "SimCLR v2 converted": ({"resnet": _backbone(ONLINE), "head": _mlp("")}, ONLINE, "SimCLR v2"),
    "DINO": ({"student": {**_under("module.backbone.", _backbone(ONLINE)), **_mlp("module.head.mlp.")},
              "teacher": {**_under("backbone.", _backbone(MOMENTUM)), **_mlp("head.mlp.")},
              "epoch": 100, "args": argparse.Namespace(arch="resnet18")}, MOMENTUM,
             "DINO, momentum network (teacher/backbone.*)"),
    "BYOL": ({**_under("online_network.encoder.", _backbone(ONLINE)), **_mlp("online_network.projector."),
              **_under("target_network.encoder.", _backbone(MOMENTUM)), **_mlp("predictor.")}, ONLINE,
             "BYOL, online network"),
    "SwAV": ({**_under("module.", _backbone(ONLINE)), **_mlp("module.projection_head."),
              "module.prototypes.weight": torch.randn(3000, 128)}, ONLINE, "DistributedDataParallel"),
    "Barlow Twins / VICReg release": (_backbone(ONLINE), ONLINE, "torchvision / timm state dict"),
    "solo-learn": ({"epoch": 9, "pytorch-lightning_version": "2.1.0", "state_dict": {
        **_under("backbone.", _backbone(ONLINE)), **_under("momentum_backbone.", _backbone(MOMENTUM)),
        **_mlp("projector."), "classifier.weight": torch.randn(10, 512)}}, ONLINE,
        "PyTorch Lightning (solo-learn), online network"),
    "lightly": ({**_under("backbone.", _sequential(ONLINE)), **_mlp("projection_head.layers.")}, ONLINE,
                "nn.Sequential numbering"),
    "PyTorch Lightning": ({"epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.1.0",
                           "state_dict": _under("model.", ONLINE), "hyper_parameters": {"lr": 0.1}}, ONLINE,
                          "PyTorch Lightning (state_dict/model.*)"),
}


def _expected_body(tv_state) -> dict[str, torch.Tensor]:
    return _sequential(_backbone(tv_state))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_loads_its_backbone_tensor_for_tensor(layout, tmp_path):
    ckpt, source, words = LAYOUTS[layout]
    path = tmp_path / "weights.pth"
    torch.save(ckpt, path)
    init = resolve_init(str(path), None, tmp_path)
    assert init.arch == "resnet18"  # told by the keys and shapes, not given
    assert words in init.layout, init.layout
    body = init.build().body.state_dict()
    if source is None:  # the counters a file lacks stay at their start, everything else is the file's
        source = {**ONLINE, **{k: torch.tensor(0) for k in ONLINE if "num_batches" in k}}
    expected = _expected_body(source)
    assert body.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(body[k], v), k
    counters = sum("num_batches" in k for k in expected)
    assert init.tensors == len(expected) - (counters if "no BatchNorm" in layout else 0)
    assert len(init.sha256) == 64 and init.sha256[:16] in init.describe()


def test_the_other_network_of_a_pair_is_picked_by_option(tmp_path):
    for layout, online in (("MoCo v1/v2", True), ("DINO", False), ("solo-learn", True), ("timm training checkpoint", True)):
        path = tmp_path / f"{layout.replace('/', '-')}.pth"
        torch.save(LAYOUTS[layout][0], path)
        other = "momentum" if online else "online"
        init = resolve_init(str(path), "resnet18", tmp_path, branch=other)
        expected = _expected_body(MOMENTUM if online else ONLINE)
        assert all(torch.equal(init.encoder_state[k], v) for k, v in expected.items()), layout
        assert other in init.layout or "EMA" in init.layout, init.layout
    path = tmp_path / "tv.pth"
    torch.save(ONLINE, path)
    with pytest.raises(ConfigError, match="holds no momentum network"):
        resolve_init(str(path), None, tmp_path, branch="momentum")


def test_a_resnet50_moco_v2_release_and_the_arch_told_apart_from_resnet34_and_18(tmp_path):
    sd = _state("resnet50", 3)
    ckpt = {"epoch": 800, "arch": "resnet50", "state_dict": {
        **_under("module.encoder_q.", _backbone(sd)), **_mlp("module.encoder_q.fc.", 2048),
        **_under("module.encoder_k.", _backbone(_state("resnet50", 4))), "module.queue": torch.randn(128, 65536)}}
    torch.save(ckpt, tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    init = resolve_init(str(tmp_path / "moco_v2_800ep_pretrain.pth.tar"), None, tmp_path)
    assert init.arch == "resnet50" and init.tensors == len(_backbone(sd))
    assert all(torch.equal(init.encoder_state[k], v) for k, v in _expected_body(sd).items())
    # a ResNet-34 holds every key of a ResNet-18: the larger network whose backbone is whole is taken
    torch.save(_state("resnet34"), tmp_path / "r34.pth")
    assert resolve_init(str(tmp_path / "r34.pth"), None, tmp_path).arch == "resnet34"
    with pytest.raises(ConfigError, match="holds resnet34 weights .*, not resnet18"):
        resolve_init(str(tmp_path / "r34.pth"), "resnet18", tmp_path)


def test_frozen_embeddings_are_identical_whatever_layout_the_weights_came_in(tmp_path):
    x = torch.randn(2, 3, 64, 80)
    outputs = []
    for layout in ("torchvision", "MoCo v1/v2", "lightly", "PyTorch Lightning", "SwAV"):
        path = tmp_path / f"{layout.replace('/', '-')}.pth"
        torch.save(LAYOUTS[layout][0], path)
        with torch.no_grad():
            outputs.append(resolve_init(str(path), None, tmp_path).build().eval()(x))
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])


def _one_line(path, *needles, arch=None):
    with pytest.raises(ConfigError) as e:
        resolve_init(str(path), arch, path.parent)
    line = e.value.one_line()
    assert "\n" not in line and str(path) in line, line
    for needle in needles:
        assert needle in line, line
    return line


def test_partial_misshaped_and_unknown_files_get_one_line_naming_the_layout_and_key(tmp_path):
    moco = {"state_dict": {k: v for k, v in LAYOUTS["MoCo v1/v2"][0]["state_dict"].items()
                           if k != "module.encoder_q.layer3.1.bn2.running_var" and not k.startswith("module.encoder_k.")}}
    torch.save(moco, tmp_path / "partial.pth")
    _one_line(tmp_path / "partial.pth", "looks like MoCo v1/v2", "resnet18", "lacks 1 of its",
              "module.encoder_q.layer3.1.bn2.running_var")

    wide = dict(ONLINE)
    wide["layer2.0.conv1.weight"] = torch.randn(256, 64, 3, 3)  # a wider network's
    torch.save(wide, tmp_path / "wide.pth")
    _one_line(tmp_path / "wide.pth", "layer2.0.conv1.weight is [256, 64, 3, 3] where a resnet18 has [128, 64, 3, 3]",
              arch="resnet18")

    torch.save({"encoder.weight": torch.randn(4, 4), "decoder.weight": torch.randn(4, 4)}, tmp_path / "other.pth")
    _one_line(tmp_path / "other.pth", "matches no checkpoint layout", "encoder.weight", "docs/checkpoints.md")

    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    _one_line(tmp_path / "notes.txt", "is not a checkpoint torch can read")

    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "empty.pth")
    _one_line(tmp_path / "empty.pth", "holds no tensors")


class _Payload:
    """Unpickling this would run os.system: the loader must refuse before it runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": ONLINE, "extra": _Payload(marker)}, tmp_path / "evil.pth")
    line = _one_line(tmp_path / "evil.pth", "would run code: refused")
    assert "system" in line and not marker.exists()


def test_named_imagenet_inits_say_what_to_fetch_and_check_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as e:
        resolve_init("imagenet-simclr", None, tmp_path)
    line = e.value.one_line()
    assert "resnet50-1x.pth" in line and "google-research/simclr" in line and "tonylins/simclr-converter" in line
    assert str(tmp_path / "hub" / "checkpoints") in line and "--weights" in line
    with pytest.raises(ConfigError, match="moco_v2_800ep_pretrain.pth.tar"):
        resolve_init("imagenet-moco", None, tmp_path)
    with pytest.raises(ConfigError, match="exists for resnet50 only, not resnet18"):
        resolve_init("imagenet-moco", "resnet18", tmp_path)

    sd = _state("resnet50", 5)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": sd}, tmp_path / "hub" / "checkpoints" / "resnet50-1x.pth")  # as the converter writes it
    init = resolve_init("imagenet-simclr", None, tmp_path)
    assert init.kind == "imagenet-simclr" and init.arch == "resnet50"
    assert torch.equal(init.encoder_state["0.weight"], sd["conv1.weight"])
    torch.save(sd, tmp_path / "supervised.pth")  # a supervised file given as MoCo's is refused
    with pytest.raises(ConfigError, match="is not a MoCo checkpoint"):
        resolve_init("imagenet-moco", None, tmp_path, weights=tmp_path / "supervised.pth")


def test_finetune_and_evaluate_say_and_record_what_they_loaded(demo_store, tmp_path):
    """Through the CLI: the same weights as a MoCo file and as a torchvision file give the same
    frozen kNN predictions; the first line names the layout, the tensors and the sha256."""
    from audiofx.pipeline.datasets.base import file_sha256 as sha256_of

    runs, store = tmp_path / "runs", str(demo_store)
    for name, ckpt in (("moco", LAYOUTS["MoCo v1/v2"][0]), ("tv", ONLINE)):
        torch.save(ckpt, tmp_path / f"{name}.pth")
        proc = run_cli("evaluate", "--run", str(tmp_path / f"{name}.pth"), "--dataset", "demo", "--mode", "knn",
                       "--fold", "1", "--store", store, "--runs", str(runs), "--name", f"ev-{name}", "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        first = proc.stdout.splitlines()[0]
        assert sha256_of(tmp_path / f"{name}.pth")[:16] in first and f"{len(_backbone(ONLINE))} tensors" in first
        config = json.loads((runs / "evaluate" / f"ev-{name}" / "config.json").read_text())
        assert config["init_sha256"] == sha256_of(tmp_path / f"{name}.pth") and config["arch"] == "resnet18"
    assert "MoCo v1/v2" in json.loads((runs / "evaluate" / "ev-moco" / "config.json").read_text())["init_layout"]
    preds = [np.load(runs / "evaluate" / f"ev-{n}" / "predictions" / "fold-1.npz") for n in ("moco", "tv")]
    assert len(preds[0]["clip"]) > 0
    for k in ("clip", "y_pred", "scores"):
        assert np.array_equal(preds[0][k], preds[1][k]), k


def test_pretrain_starts_from_given_weights_records_them_and_resume_keeps_them(demo_store, tmp_path):
    from audiofx.pipeline.datasets.base import file_sha256 as sha256_of
    from audiofx.training.models.encoders import build_encoder

    def lightly_file(seed: int) -> Path:  # a tiny backbone saved as lightly saves one
        torch.manual_seed(seed)
        path = tmp_path / f"tiny-{seed}.pth"
        torch.save({**_under("backbone.", build_encoder("tiny").body.state_dict()),
                    **_mlp("projection_head.layers.", 128)}, path)
        return path

    runs = tmp_path / "runs"
    start = lightly_file(0)
    args = ["pretrain", "--method", "simclr", "--datasets", "demo", "--store", str(demo_store), "--runs", str(runs),
            "--epochs", "1", "--batch-size", "32", "--lr", "1e-9", "--name", "from-file",
            "--no-progress", "--device", "cpu"]
    proc = run_cli(*args, "--init", str(start))
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("init: file") and "lightly" in first and sha256_of(start)[:16] in first and "tiny" in first
    run = runs / "pretrain" / "from-file"
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] == "tiny" and config["init"] == str(start) and config["init_sha256"] == sha256_of(start)
    # a learning rate of 1e-9 leaves the weights where they started: the run began at the file's
    final = torch.load(run / "checkpoints" / "final.pt", weights_only=True)["states"]["encoder"]
    given = torch.load(start, weights_only=True)
    convs = [k for k in given if k.startswith("backbone.") and k.endswith("weight") and given[k].dim() == 4]
    assert convs and all(torch.allclose(final["body." + k[len("backbone."):]], given[k], atol=1e-6) for k in convs)

    assert run_cli(*args, "--init", str(start), "--resume").returncode == 0  # finished: nothing left to do
    other = lightly_file(1)
    other.replace(start)  # the same path, other weights: another run, refused on resume
    proc = run_cli(*args, "--init", str(start), "--resume")
    assert proc.returncode != 0 and "init_sha256" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
