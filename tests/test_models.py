"""Encoders: output shapes for every arch, ImageNet weights from a local file, offline errors."""

from __future__ import annotations

import pytest
import torch

from audiofx.errors import ConfigError
from audiofx.training.models import (
    Classifier,
    build_encoder,
    imagenet_weights_file,
    load_imagenet,
)


@pytest.mark.parametrize("arch,dim", [("tiny", 128), ("resnet18", 512), ("resnet50", 2048), ("vgg16", 512),
                                      ("alexnet", 256)])
def test_encoders_pool_to_vectors(arch, dim):
    enc = build_encoder(arch).eval()
    with torch.no_grad():
        out = enc(torch.randn(2, 3, 128, 100))  # fully convolutional: any (bins, frames)
    assert out.shape == (2, dim) and enc.out_dim == dim


def test_imagenet_state_dict_loads_into_the_body(tmp_path):
    """A torchvision-format checkpoint (here: a randomly initialised resnet18 saved the way
    torchvision publishes them) loads into the encoder tensor for tensor."""
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), path)
    enc = build_encoder("resnet18")
    load_imagenet(enc, imagenet_weights_file("resnet18", path))
    assert torch.equal(enc.body[0].weight, reference.conv1.weight)
    assert torch.equal(enc.body[7][1].bn2.running_var, reference.layer4[1].bn2.running_var)
    x = torch.randn(1, 3, 64, 64)
    reference.eval(), enc.eval()
    with torch.no_grad():
        expected = torch.flatten(reference.avgpool(torch.nn.Sequential(*list(reference.children())[:-2])(x)), 1)
        assert torch.allclose(enc(x), expected, atol=1e-5)


def test_offline_without_weights_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as err:
        imagenet_weights_file("resnet50")
    assert "resnet50-11ad3fa6.pth" in err.value.hint and "--weights" in err.value.hint


def test_wrong_checkpoint_is_rejected(tmp_path):
    import torchvision

    path = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit resnet18"):
        load_imagenet(build_encoder("resnet18"), path)


def test_classifier_head():
    model = Classifier(build_encoder("tiny"), 7)
    assert model(torch.randn(3, 3, 32, 40)).shape == (3, 7)
