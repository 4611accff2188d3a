"""Zhou et al. 2019's techniques: time fragments, left/right/mid channel fusion (late fusion of
softmax posteriors per clip), the MLP-attention head, and all three through the real CLI on
a stereo dataset extracted with the zhou2019 preset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from audiofx.errors import ConfigError
from audiofx.pipeline.reading import load_fold
from audiofx.pipeline.store import FeatureStore
from audiofx.training.models.encoders import Classifier, MLPAttentionHead, build_encoder
from audiofx.training.stages.fusion import expand_channels, fuse_posteriors, split_fragments
from audiofx.training.stages.runs import Run
from tests.conftest import make_class_folder, run_cli


def softmax_by_hand(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def mean_rows(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(rows) for col in zip(*rows)]


# -- fragments ----------------------------------------------------------------------------------

def test_split_fragments_cuts_equal_fragments_in_clip_order_and_drops_the_remainder():
    x = torch.arange(2 * 3 * 4 * 11, dtype=torch.float32).reshape(2, 3, 4, 11)
    out, clip_index = split_fragments(x, 3)
    length = 11 // 3  # 3 frames each; the last 2 frames of every clip are dropped
    assert out.shape == (6, 3, 4, length)
    assert clip_index.tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(2):
        for j in range(3):
            assert torch.equal(out[i * 3 + j], x[i, :, :, j * length:(j + 1) * length])
    kept = set(out[:, 0, 0].flatten().tolist())
    assert x[0, 0, 0, 9].item() not in kept and x[0, 0, 0, 10].item() not in kept


def test_one_fragment_is_the_clip_itself_and_too_many_is_a_user_error():
    x = torch.randn(4, 3, 8, 10)
    out, clip_index = split_fragments(x, 1)
    assert out is x and clip_index.tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="cannot cut 10 frames into 11 fragments"):
        split_fragments(x, 11)


def test_fragment_posteriors_are_averaged_per_clip_as_by_hand():
    # clip 0: fragment A is sure of class 1; fragment B leans to classes 0 and 2. Averaging
    # the posteriors picks class 1, averaging the logits would pick class 0: this tells the
    # two apart.
    logits = [[0.0, 5.0, 0.0], [2.0, -10.0, 1.5],   # clip 0
              [1.0, 0.0, 3.0], [0.5, 0.2, 2.0]]      # clip 1
    fused = fuse_posteriors(torch.tensor(logits), torch.tensor([0, 0, 1, 1]), 2)
    expected = [mean_rows([softmax_by_hand(logits[0]), softmax_by_hand(logits[1])]),
                mean_rows([softmax_by_hand(logits[2]), softmax_by_hand(logits[3])])]
    assert np.allclose(fused.numpy(), expected, atol=1e-6)
    assert [max(range(3), key=row.__getitem__) for row in expected] == [1, 2]
    assert fused.argmax(1).tolist() == [1, 2]
    assert torch.tensor(logits[:2]).mean(0).argmax().item() == 0  # the logit mean would disagree
    assert fused.sum(1).tolist() == pytest.approx([1.0, 1.0])


def test_fuse_posteriors_needs_every_clip():
    with pytest.raises(ValueError, match="every clip"):
        fuse_posteriors(torch.zeros(2, 3), torch.tensor([0, 2]), 3)


# -- channel fusion -----------------------------------------------------------------------------

def test_expand_channels_repeats_each_channel_three_times_without_copying():
    x = torch.randn(2, 3, 4, 5)  # (clips, left/right/mid, bins, frames)
    out, clip_index = expand_channels(x)
    assert out.shape == (6, 3, 4, 5) and clip_index.tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(2):
        for c in range(3):
            for k in range(3):
                assert torch.equal(out[i * 3 + c, k], x[i, c])
    assert out.data_ptr() == x.data_ptr()  # a view: the expansion costs no memory


def test_channel_and_fragment_posteriors_fuse_to_one_prediction_per_clip_as_by_hand():
    x = torch.randn(2, 3, 4, 10)
    frags, frag_clip = split_fragments(x, 2)  # 4 fragments
    samples, frag_of_sample = expand_channels(frags)  # 12 samples
    clip_index = frag_clip[frag_of_sample]
    assert clip_index.tolist() == [0] * 6 + [1] * 6
    # sample 3 is clip 0, fragment 1, channel 0 (left), repeated
    assert torch.equal(samples[3, 2], x[0, 0, :, 5:10])
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(3)) * 3
    fused = fuse_posteriors(logits, clip_index, 2)
    rows = [softmax_by_hand(r) for r in logits.tolist()]
    expected = [mean_rows(rows[:6]), mean_rows(rows[6:])]
    assert np.allclose(fused.numpy(), expected, atol=1e-6)


# -- the MLP-attention head ---------------------------------------------------------------------

def test_mlp_attention_head_matches_the_formula_by_hand():
    torch.manual_seed(0)
    head = MLPAttentionHead(in_dim=4, n_classes=3, hidden=5)
    with torch.no_grad():
        head.u.copy_(torch.randn(5))  # not the initial ones, so u really enters the check
    fmap = torch.randn(2, 4, 2, 3)  # (batch, C, bins', frames'): 6 positions
    W, b, u = head.proj.weight, head.proj.bias, head.u
    expected = []
    for s in range(2):
        e = [u * torch.tanh(W @ fmap[s, :, h, t] + b) for h in range(2) for t in range(3)]
        pooled = torch.stack(e).mean(0)
        expected.append(head.fc.weight @ pooled + head.fc.bias)
    assert torch.allclose(head(fmap), torch.stack(expected), atol=1e-6)


def test_classifier_with_mlp_attention_reads_the_unpooled_map():
    enc = build_encoder("tiny").eval()
    model = Classifier(enc, 3, head="mlp-attn").eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        fmap = enc.features(x)
        assert fmap.shape == (2, 128, 2, 3)
        assert torch.allclose(enc(x), fmap.mean(dim=(2, 3)), atol=1e-6)
        assert torch.allclose(model(x), model.head(fmap), atol=1e-6)
    assert model.head.proj.weight.shape == (256, 128)  # C' = 256 by C = the encoder's channels
    with pytest.raises(ConfigError, match="unknown head"):
        Classifier(enc, 3, head="attention")


# -- end to end through the CLI ------------------------------------------------------------------

@pytest.fixture(scope="module")
def stereo_store(tmp_path_factory) -> Path:
    """Left/right/mid log-mels (preset zhou2019) of a small stereo class-per-folder dataset:
    3 scenes x 4 clips of 1 s at 44.1 kHz, 2 folds, 44 frames per clip."""
    base = tmp_path_factory.mktemp("stereo")
    make_class_folder(base / "raw", classes=3, per_class=4, seconds=1.0, sr=44100, channels=2)
    proc = run_cli("extract", "--dataset", "folder", "--root", str(base / "raw"), "--store", str(base / "features"),
                   "--preset", "zhou2019", "--set", "clip_seconds=1", "--set", "folds=2", "--workers", "1",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return base / "features"


def test_finetune_with_fragments_channel_fusion_and_mlp_attention_predicts_per_clip(stereo_store, tmp_path):
    proc = run_cli("finetune", "--dataset", "folder", "--store", str(stereo_store), "--preset", "zhou2019",
                   "--runs", str(tmp_path), "--arch", "tiny", "--fragments", "2", "--channel-fusion",
                   "--head", "mlp-attn", "--epochs", "1", "--fold", "1", "--name", "z", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    run = Run(tmp_path / "finetune" / "z")
    config = run.config
    assert (config["fragments"], config["channel_fusion"], config["head"]) == (2, True, "mlp-attn")
    records = run.metrics()
    assert [r["fold"] for r in records if r["event"] == "fold_done"] == ["1"]  # one result per fold

    # Predictions are saved per clip (6 clips in fold 1), not per sample (6 x 2 fragments x 3 channels).
    fs = FeatureStore(stereo_store)
    x, y, clips = load_fold(fs, "folder", config["key"], "1")
    assert x.shape == (6, 3, 128, 44)
    assert not np.array_equal(x[:, 0], x[:, 1])  # left and right differ: the clips really are stereo
    pred = run.predictions()["1"]
    assert list(pred["clip"]) == [str(c) for c in clips] and pred["scores"].shape == (6, 3)
    assert np.array_equal(pred["y_true"], y)
    assert np.allclose(pred["scores"].sum(1), 1.0, atol=1e-5)  # fused posteriors, not logits

    # The logged accuracy is the per-clip accuracy of those predictions.
    last = [r["test_acc"] for r in records if r["event"] == "epoch"][-1]
    assert last == pytest.approx(float((pred["y_pred"] == pred["y_true"]).mean()))
    report = json.loads((run.path / "per_class.json").read_text())
    assert np.array(report["confusion"]).sum() == 6

    # The fused scores, recomputed by hand from the checkpoint: standardise each source channel
    # with the training folds' statistics (stored as float16, as the training set is), cut
    # 2 fragments of 22 frames, repeat each channel to 3, average the 6 posteriors of a clip.
    ckpt = torch.load(run.checkpoint_path("fold-1"), weights_only=True)["states"]
    model = Classifier(build_encoder("tiny"), 3, head="mlp-attn")
    model.load_state_dict(ckpt["model"])
    model.eval()
    xs = ((torch.from_numpy(np.asarray(x)).float() - ckpt["mean"]) / ckpt["std"]).half().float()
    with torch.no_grad():
        for i in range(6):
            posteriors = [torch.softmax(model(xs[i:i + 1, c:c + 1, :, j * 22:(j + 1) * 22].repeat(1, 3, 1, 1)), 1)
                          for j in range(2) for c in range(3)]
            assert torch.allclose(torch.cat(posteriors).mean(0), torch.from_numpy(pred["scores"][i]), atol=1e-4)


def test_encoder_takes_one_chosen_channel_or_a_one_channel_set_repeated_on_its_three_inputs():
    enc = build_encoder("tiny").eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        whole = enc(x)
        enc.input_channel = 2
        mid = enc(x)
        enc.input_channel = None
        assert torch.equal(mid, enc(x[:, 2:3]))  # one channel chosen or stored: the same input
        assert torch.equal(mid, enc(x[:, 2:3].repeat(1, 3, 1, 1)))
        assert torch.equal(whole, enc(x)) and not torch.allclose(whole, mid)


def test_finetune_on_the_average_channel_alone(stereo_store, tmp_path):
    """Zhou et al.'s one-channel rows: "The system uses only the average channel" (mid)."""
    common = ("finetune", "--dataset", "folder", "--store", str(stereo_store), "--preset", "zhou2019",
              "--runs", str(tmp_path), "--arch", "tiny", "--epochs", "1", "--fold", "1", "--no-progress")
    proc = run_cli(*common, "--input-channel", "mid", "--name", "mid")
    assert proc.returncode == 0, proc.stderr
    assert "input channel mid alone" in proc.stdout
    run = Run(tmp_path / "finetune" / "mid")
    assert (run.config["input_channel"], run.config["input_channel_index"]) == ("mid", 2)
    x, _, _ = load_fold(FeatureStore(stereo_store), "folder", run.config["key"], "1")
    ckpt = torch.load(run.checkpoint_path("fold-1"), weights_only=True)["states"]
    model = Classifier(build_encoder("tiny"), 3)
    model.load_state_dict(ckpt["model"])
    model.eval()
    xs = ((torch.from_numpy(np.asarray(x)).float() - ckpt["mean"]) / ckpt["std"]).half().float()
    with torch.no_grad():
        by_hand = model(xs[:, 2:3].repeat(1, 3, 1, 1))  # whole clips: the scores are the logits
    assert torch.allclose(by_hand, torch.from_numpy(run.predictions()["1"]["scores"]), atol=1e-4)
    for bad, says in ((("--input-channel", "centre"), "'centre' is not one channel of the 3 stored (0: left"),
                      (("--input-channel", "3"), "'3' is not one channel"),
                      (("--input-channel", "0", "--channel-fusion"), "both say which channels")):
        refused = run_cli(*common, *bad, "--name", "bad")
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr
    assert not (tmp_path / "finetune" / "bad").exists()


def test_a_run_from_before_these_options_resumes_only_with_them_at_their_defaults(tmp_path):
    from audiofx.training.models.augment import Augment
    from audiofx.training.stages.finetune import _LATER_OPTIONS, FinetuneConfig

    recorded = {**FinetuneConfig(dataset="demo", runs_root=str(tmp_path)).to_json(), "arch": "tiny"}
    for later in ("fragments", "channel_fusion", "head"):
        del recorded[later]  # config.json as written before the options existed
    for later in ("resized_crop", "gain_db", "eq_db", "per_db"):
        del recorded["augment"][later]  # and before the views had these fields
    Run.create(tmp_path, "finetune", "old", recorded)
    same = FinetuneConfig(dataset="demo", runs_root=str(tmp_path), name="old", resume=True)
    Run.create(tmp_path, "finetune", "old", {**same.to_json(), "arch": "tiny"}, resume=True, later=_LATER_OPTIONS)
    other = FinetuneConfig(dataset="demo", runs_root=str(tmp_path), name="old", resume=True, fragments=6)
    with pytest.raises(ConfigError, match=r"other settings \(fragments 1, now 6\)"):
        Run.create(tmp_path, "finetune", "old", {**other.to_json(), "arch": "tiny"}, resume=True, later=_LATER_OPTIONS)
    louder = FinetuneConfig(dataset="demo", runs_root=str(tmp_path), name="old", resume=True,
                            augment=Augment(gain_db=3.0))
    with pytest.raises(ConfigError, match=r"other settings \(augment.gain_db 0.0, now 3.0\)"):
        Run.create(tmp_path, "finetune", "old", {**louder.to_json(), "arch": "tiny"}, resume=True, later=_LATER_OPTIONS)
