"""ESResNet with attention (--arch esresnet50): stage outputs gated by masks from each stage's
input, ImageNet ResNet-50 weights loading into its ResNet part with the attention fresh, and
one epoch through each of the three stages."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from audiofx.pipeline.extract import ExtractRequest, extract
from audiofx.training.models.encoders import build_encoder
from audiofx.training.stages.weights import resolve_init
from tests.conftest import run_cli


def _plain_resnet50_features(body, x):
    """The same weights as a plain ResNet-50: stem and stages without the gates."""
    x = body.maxpool(body.relu(body.bn1(body.conv1(x))))
    for stage in (body.layer1, body.layer2, body.layer3, body.layer4):
        x = stage(x)
    return x


def test_every_stage_is_gated_by_a_mask_from_its_input():
    torch.manual_seed(0)
    encoder = build_encoder("esresnet50").eval()
    body = encoder.body
    x = torch.randn(2, 3, 128, 100)
    masks = {}
    for i in range(1, 6):
        getattr(body, f"att{i}").register_forward_hook(lambda m, a, out, i=i: masks.__setitem__(i, out))
    with torch.no_grad():
        fmap = encoder.features(x)
        pooled = encoder(x)
    assert fmap.shape == (2, 2048, 4, 4) and pooled.shape == (2, 2048)
    # masks of each stage output's shape (the last one per channel), strictly between 0 and 1
    assert [tuple(masks[i].shape[1:]) for i in range(1, 6)] == [(256, 32, 25), (512, 16, 13), (1024, 8, 7),
                                                               (2048, 4, 4), (2048, 1, 1)]
    assert all(0 < float(m.min()) and float(m.max()) < 1 for m in masks.values())
    with torch.no_grad():  # masks forced to 1 (BatchNorm's shift +50): the plain ResNet-50 comes back
        for i in range(1, 6):
            getattr(body, f"att{i}").bn.bias.fill_(50.0)
        torch.testing.assert_close(encoder.features(x), _plain_resnet50_features(body, x))
        assert not torch.allclose(fmap, encoder.features(x))  # and with the real masks it differed

    encoder = build_encoder("esresnet50").train()  # fresh masks (the forced ones pass no gradient)
    body = encoder.body
    encoder(torch.randn(2, 3, 64, 48)).sum().backward()
    for name in ("conv1.weight", "layer4.2.conv3.weight", "att1.depthwise.weight", "att5.pointwise.weight"):
        assert body.get_parameter(name).grad.abs().sum() > 0, name


def test_imagenet_resnet50_weights_load_and_the_attention_starts_fresh(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet50(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet50-11ad3fa6.pth")
    init = resolve_init("imagenet", "esresnet50", weights=tmp_path / "resnet50-11ad3fa6.pth")
    assert init.arch == "esresnet50" and init.fresh == 40  # 5 branches x 8 tensors
    assert "40 tensors of esresnet50's attention start fresh" in init.describe()
    body = init.build().body
    for name, tensor in reference.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(body.state_dict()[name], tensor), name
    # the same file without --arch is a plain ResNet-50; an ESResNet's own checkpoint is an ESResNet
    assert resolve_init(str(tmp_path / "resnet50-11ad3fa6.pth"), None, tmp_path).arch == "resnet50"
    torch.save(build_encoder("esresnet50").state_dict(), tmp_path / "es.pt")
    own = resolve_init(str(tmp_path / "es.pt"), None, tmp_path)
    assert (own.arch, own.fresh) == ("esresnet50", 0)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from tests import layouts as L

    base = tmp_path_factory.mktemp("esresnet")
    extract(ExtractRequest(dataset="esc50", root=L.make_esc50(base / "esc50", categories=L.ESC50_CATEGORIES[:2]),
                           store=str(base / "features"), overrides={"clip_seconds": 0.5, "frames": 24}, workers=1,
                           progress=False), on_event=lambda m: None)
    return base / "features"


def test_one_epoch_through_pretrain_finetune_and_evaluate(small_store, tmp_path):
    runs = tmp_path / "runs"
    common = ["--store", str(small_store), "--runs", str(runs), "--device", "cpu"]
    proc = run_cli("pretrain", "--method", "npid", "--nce-k", "0", "--arch", "esresnet50", "--datasets", "esc50",
                   "--epochs", "1", "--batch-size", "4", "--name", "es", "--no-progress", *common)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((runs / "pretrain" / "es" / "config.json").read_text())["arch"] == "esresnet50"
    proc = run_cli("finetune", "--dataset", "esc50", "--init", "npid:es", "--fold", "1", "--epochs", "1",
                   "--batch-size", "4", "--name", "es-ft", "--no-progress", *common)
    assert proc.returncode == 0, proc.stderr
    assert "esresnet50" in proc.stdout.splitlines()[0]
    proc = run_cli("evaluate", "--run", "npid:es", "--dataset", "esc50", "--mode", "knn", "--fold", "1",
                   "--name", "es-knn", *common)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((runs / "evaluate" / "es-knn" / "config.json").read_text())["arch"] == "esresnet50"
