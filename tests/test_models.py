"""Encoders: output shapes for every arch, ImageNet weights from a local file, offline errors."""

from __future__ import annotations

import pytest
import torch

from audiofx.errors import ConfigError
from audiofx.training.models.encoders import (
    Classifier,
    build_encoder,
    check_input_size,
    min_input_size,
)
from audiofx.training.models.published import imagenet_weights_file
from audiofx.training.stages.weights import resolve_init


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
    enc = resolve_init("imagenet", "resnet18", weights=path).build()
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
    with pytest.raises(ConfigError, match="holds alexnet weights .*, not resnet18"):
        resolve_init("imagenet", "resnet18", weights=path)


def test_classifier_head():
    model = Classifier(build_encoder("tiny"), 7)
    assert model(torch.randn(3, 3, 32, 40)).shape == (3, 7)


# -- VGG-16 and AlexNet as fully convolutional networks (Zhou et al. 2019) ----------------------

@pytest.mark.parametrize("arch,channels,map_250,map_100", [("vgg16", 512, (4, 7), (4, 3)),
                                                            ("alexnet", 256, (3, 6), (3, 2))])
def test_vgg16_and_alexnet_are_fully_convolutional_with_global_average_pooling(arch, channels, map_250, map_100):
    enc = build_encoder(arch).eval()
    kinds = {type(m) for m in enc.body.modules()}
    # the conv stack only: no adaptive pool to 7x7 / 6x6, no dropout, no fully connected classifier
    assert not kinds & {torch.nn.Linear, torch.nn.Dropout, torch.nn.AdaptiveAvgPool2d}
    assert torch.nn.Conv2d in kinds and torch.nn.MaxPool2d in kinds
    with torch.no_grad():
        for frames, expected in ((250, map_250), (100, map_100)):  # 5 s clips; the demo's 2 s clips
            x = torch.randn(1, 3, 128, frames)
            fmap = enc.features(x)
            assert fmap.shape == (1, channels, *expected)
            assert torch.allclose(enc(x), fmap.mean(dim=(2, 3)), atol=1e-5)


@pytest.mark.parametrize("arch", ["vgg16", "alexnet"])
def test_imagenet_weights_load_into_the_vgg16_and_alexnet_conv_stacks(arch, tmp_path):
    """A checkpoint with torchvision's key names (features.N.*, classifier.N.*) loads into the
    FCN tensor for tensor. The classifier's tensors are left out of the file only to keep it
    small (VGG-16's are 0.5 GB); the loader drops them anyway."""
    import torchvision

    reference = getattr(torchvision.models, arch)(weights=None).eval()
    path = tmp_path / f"{arch}.pth"
    torch.save({k: v for k, v in reference.state_dict().items() if k.startswith("features.")}, path)
    enc = resolve_init("imagenet", arch, weights=path).build().eval()
    for name, tensor in reference.features.state_dict().items():
        assert torch.equal(enc.body.state_dict()[name], tensor), name
    x = torch.randn(1, 3, 128, 100)
    with torch.no_grad():
        assert torch.allclose(enc.features(x), reference.features(x), atol=1e-6)


def test_inputs_too_small_for_the_strides_get_a_clear_error():
    assert (min_input_size("alexnet"), min_input_size("vgg16"), min_input_size("tiny")) == (63, 32, 16)
    enc = build_encoder("alexnet").eval()
    with torch.no_grad():
        assert enc.features(torch.randn(1, 3, 128, 63)).shape == (1, 256, 3, 1)  # the smallest that works
        with pytest.raises(ConfigError, match=r"128 bins x 50 frames is too small for alexnet .*63 x 63") as err:
            enc(torch.randn(1, 3, 128, 50))  # the demo's 100 frames cut into 2 fragments
    assert "--fragments" in err.value.hint
    with pytest.raises(RuntimeError, match="too small"):
        enc.body(torch.randn(1, 3, 128, 62))  # torch alone, one frame shorter: no word of what to change
    check_input_size("vgg16", 128, 32)
    with pytest.raises(ConfigError, match="too small for vgg16"):
        check_input_size("vgg16", 128, 31)


# -- heads and checkpoint compatibility ---------------------------------------------------------

def test_checkpoints_of_the_earlier_linear_classifier_still_load():
    """The Classifier before heads were selectable: an encoder and one nn.Linear named head."""

    class EarlierClassifier(torch.nn.Module):
        def __init__(self, encoder, n_classes):
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(encoder.out_dim, n_classes)

        def forward(self, x):
            return self.head(self.encoder(x))

    old = EarlierClassifier(build_encoder("tiny"), 5).eval()
    new = Classifier(build_encoder("tiny"), 5).eval()
    assert set(new.state_dict()) == set(old.state_dict())
    new.load_state_dict(old.state_dict())  # strict
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(new(x), old(x))
    # the encoder's weights are the same tensors whichever head sits on top
    attn = Classifier(build_encoder("tiny"), 5, head="mlp-attn")
    attn.encoder.load_state_dict(old.encoder.state_dict())
    assert {k for k in attn.state_dict() if k.startswith("head.")} == {
        "head.proj.weight", "head.proj.bias", "head.u", "head.fc.weight", "head.fc.bias"}
