"""Store -> model data path: in-memory and streaming loaders, DDP shares, loader choice, augmentations."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BloscCodec, GzipCodec

from audiofx.errors import StoreError
from audiofx.pipeline.chunks import ChunkReader
from audiofx.pipeline.extract import ExtractRequest, extract
from audiofx.pipeline.reading import load_fold
from audiofx.pipeline.store import FeatureStore
from audiofx.training.data.featuresets import open_foldset
from audiofx.training.data.inputs import open_inputs
from audiofx.training.data.memory import InMemoryData, InMemoryLoader, load_in_memory, subset
from audiofx.training.data.streaming import StreamingLoader
from audiofx.training.models.augment import (
    Augment,
    mixup,
    random_freq_shift,
    random_level_eq,
    random_resized_crop,
    random_time_crop,
    random_time_shift,
    spec_augment,
)
from tests import layouts as L
from tests.conftest import make_class_folder

FAST = {"sample_rate": 22050, "clip_seconds": 0.5, "frames": 20}
CHUNK = 4  # clips per chunk in the test store, so every fold has several chunks and runs


def _extract(dataset: str, root: Path, store: Path, **overrides):
    return extract(ExtractRequest(dataset=dataset, root=root, store=str(store), overrides={**FAST, **overrides},
                                  workers=1, progress=False), on_event=lambda m: None)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """3 classes x 10 clips + one empty (skipped) file, 2 folds, 4 clips per chunk."""
    tmp = tmp_path_factory.mktemp("data")
    root = make_class_folder(tmp / "raw", classes=3, per_class=10, seconds=0.5)
    (root / "class1" / "class1-empty.wav").write_bytes(b"")
    with pytest.MonkeyPatch.context() as mp:  # workers=1 runs in this process: smaller chunks apply
        mp.setattr("audiofx.pipeline.store.MAX_CHUNK_CLIPS", CHUNK)
        summary = _extract("folder", root, tmp / "store", folds=2)
    assert len(summary.skipped) == 1
    return tmp / "store", summary.key


@pytest.fixture(scope="module")
def expected(built):
    """Fold-by-fold values from load_fold, in global index order."""
    store, key = built
    fs = FeatureStore(store)
    parts = [load_fold(fs, "folder", key, f) for f in ("1", "2")]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [str(c) for p in parts for c in p[2]])


def _indices(batches) -> list[int]:
    return [i for b in batches for i in b.index.tolist()]


def test_open_foldset_checks_manifest_and_folds(built):
    store, key = built
    fset = open_foldset(str(store), "folder", key, ["1", "2"])
    assert fset.folds == ["1", "2"] and open_foldset(str(store), "folder", key, 2).folds == ["2"]
    assert open_foldset(str(store), "folder", key).folds == ["1", "2"]
    with pytest.raises(StoreError, match="no fold '7'") as err:
        open_foldset(str(store), "folder", key, ["1", "7"])
    assert "known folds: 1, 2" in err.value.hint
    with pytest.raises(StoreError, match="no manifest"):
        open_foldset(str(store), "folder", "0123456789abcdef", ["1"])


def test_missing_manifest_is_refused(tmp_path):
    root = make_class_folder(tmp_path / "raw", classes=2, per_class=3, seconds=0.5)
    summary = _extract("folder", root, tmp_path / "store", folds=2)
    fset = open_foldset(str(tmp_path / "store"), "folder", summary.key, ["1"])
    (summary.path / "manifest.json").unlink()
    with pytest.raises(StoreError, match="no manifest"):
        open_foldset(str(tmp_path / "store"), "folder", summary.key, ["1"])
    with pytest.raises(StoreError, match="no manifest"):
        load_in_memory(fset)
    with pytest.raises(StoreError, match="no manifest"):
        StreamingLoader(fset, 4)


def test_a_pool_takes_features_of_one_power(built, tmp_path):
    """Log-magnitude is half log-power: a set extracted with --set power=1 is left out of a
    default pool of power-2 sets, and refused in a named one."""
    from audiofx.training.data.featuresets import pool_datasets

    store = tmp_path / "store"
    shutil.copytree(built[0], store)
    _extract("esc50", L.make_esc50(tmp_path / "esc50", categories=L.ESC50_CATEGORIES[:2]), store, power=1)
    said: list[str] = []
    pooled = pool_datasets(str(store), "shin2021", (), said.append)
    assert [ds for ds, _, _ in pooled] == ["folder"]
    assert said == ["left out of the pool (features not power 2 like the rest): esc50 (power 1)"]
    with pytest.raises(StoreError, match="different scales: esc50 power 1, folder power 2$") as err:
        pool_datasets(str(store), "shin2021", ("esc50", "folder"))
    assert "the same power" in err.value.hint


def test_in_memory_holds_exactly_the_usable_rows(built, expected):
    store, key = built
    x, y, clips = expected
    assert len(x) == 30  # 31 files, the empty one skipped
    data = load_in_memory(open_foldset(str(store), "folder", key, ["1", "2"]), run_bytes=1)  # one chunk per read
    assert data.x.dtype == torch.float16 and data.x.shape == (30, 3, 128, 20)
    assert torch.equal(data.x, torch.from_numpy(x))
    assert data.y.dtype == torch.int64 and data.y.tolist() == y.tolist()
    assert data.index.tolist() == list(range(30)) and data.clips == clips
    assert "class1/class1-empty.wav" not in data.clips
    assert data.fold_of == ["1"] * data.fold_of.count("1") + ["2"] * data.fold_of.count("2")
    assert data.classes == ["class0", "class1", "class2"] and not data.multilabel
    whole = load_in_memory(open_foldset(str(store), "folder", key, ["2", "1"]))  # order of folds given
    assert whole.clips == clips[data.fold_of.count("1"):] + clips[:data.fold_of.count("1")]


def test_in_memory_epochs_cover_once_and_repeat(built, expected):
    store, key = built
    data = load_in_memory(open_foldset(str(store), "folder", key, ["1", "2"]))
    loader = InMemoryLoader(data, batch_size=8, seed=3)
    assert len(loader) == 4
    epoch0 = list(loader)
    assert [len(b) for b in epoch0] == [8, 8, 8, 6]
    assert sorted(_indices(epoch0)) == list(range(30))  # every sample once
    b = epoch0[0]
    assert b.x.dtype == torch.float32 and b.y.dtype == torch.int64
    assert torch.equal(b.x, torch.from_numpy(expected[0][b.index.numpy()]).float())
    assert b.y.tolist() == expected[1][b.index.numpy()].tolist()
    epoch1 = list(loader)  # the next iter() is the next epoch
    assert _indices(epoch1) != _indices(epoch0) and sorted(_indices(epoch1)) == list(range(30))
    again = InMemoryLoader(data, batch_size=8, seed=3)
    assert _indices(again) == _indices(epoch0)
    again.set_epoch(1)
    assert _indices(again) == _indices(epoch1)
    assert _indices(InMemoryLoader(data, batch_size=8, seed=4)) != _indices(epoch0)
    assert _indices(InMemoryLoader(data, batch_size=8, shuffle=False)) == list(range(30))
    dropped = InMemoryLoader(data, batch_size=8, drop_last=True)
    assert len(dropped) == 3 and [len(b) for b in dropped] == [8, 8, 8]


def test_in_memory_ranks_are_disjoint_and_cover(built):
    store, key = built
    data = load_in_memory(open_foldset(str(store), "folder", key, ["1", "2"]))
    ranks = [InMemoryLoader(data, batch_size=4, seed=1, rank=r, world_size=2) for r in range(2)]
    shares = [_indices(loader) for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 4 and len(shares[0]) == len(shares[1]) == 15
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(30))
    # 4 ranks: 30 is not a multiple, so the shares are padded by wrapping to 8 each
    shares = [_indices(InMemoryLoader(data, 4, seed=1, rank=r, world_size=4)) for r in range(4)]
    assert all(len(s) == 8 for s in shares)
    everything = [i for s in shares for i in s]
    assert set(everything) == set(range(30)) and len(everything) - len(set(everything)) == 2


def _stream_check(batches, expected, n_expected):
    x, y, _ = expected
    seen = []
    for b in batches:
        idx = b.index.numpy()
        assert b.x.dtype == torch.float32 and torch.equal(b.x, torch.from_numpy(x[idx]).float())
        assert b.y.tolist() == y[idx].tolist()
        seen += idx.tolist()
    assert len(seen) == n_expected
    return seen


def test_streaming_yields_every_sample_once(built, expected):
    store, key = built
    fset = open_foldset(str(store), "folder", key, ["1", "2"])
    loader = StreamingLoader(fset, batch_size=8, seed=5, run_chunks=1, buffer_chunks=2, threads=2)
    assert len(loader.runs) == 8 and len(loader) == 4  # 4 chunks per fold, 1 chunk per run
    epoch0 = list(loader)
    assert sorted(_stream_check(epoch0, expected, 30)) == list(range(30))
    assert [len(b) for b in epoch0] == [8, 8, 8, 6]
    epoch1 = list(loader)
    assert sorted(_indices(epoch1)) == list(range(30)) and _indices(epoch1) != _indices(epoch0)
    assert _indices(StreamingLoader(fset, 8, seed=5, run_chunks=1, buffer_chunks=2)) == _indices(epoch0)
    assert _indices(StreamingLoader(fset, 8, shuffle=False, run_chunks=2)) == list(range(30))
    dropped = StreamingLoader(fset, 8, drop_last=True, run_chunks=1)
    assert len(dropped) == 3 and [len(b) for b in dropped] == [8, 8, 8]
    # early exit of an epoch stops the reader threads cleanly
    it = iter(StreamingLoader(fset, 4, run_chunks=1))
    next(it)
    it.close()
    # no open Zarr array inside: the loader pickles, before and after an epoch
    copy = pickle.loads(pickle.dumps(loader))
    copy.set_epoch(0)
    assert _indices(copy) == _indices(epoch0)


def test_streaming_ranks_are_disjoint_and_cover(built, expected):
    store, key = built
    fset = open_foldset(str(store), "folder", key, ["1", "2"])
    loaders = [StreamingLoader(fset, 4, seed=2, run_chunks=1, buffer_chunks=1, rank=r, world_size=2) for r in range(2)]
    shares = [_stream_check(loader, expected, 15) for loader in loaders]
    assert len(loaders[0]) == len(loaders[1]) == 4
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(30))
    # every rank reads its own runs: at most the run at the boundary is shared (split by rows)
    plans = [loader.plan(0) for loader in loaders]
    runs = [{(p.run.fold, p.run.first) for p in plan} for plan in plans]
    assert len(runs[0]) + len(runs[1]) >= 8  # between them, the ranks read all 8 runs
    assert len(runs[0] & runs[1]) <= 1
    # 4 ranks: equal shares, padded by wrapping
    shares = [_indices(StreamingLoader(fset, 4, seed=2, run_chunks=2, rank=r, world_size=4)) for r in range(4)]
    assert all(len(s) == 8 for s in shares)
    everything = [i for s in shares for i in s]
    assert set(everything) == set(range(30)) and len(everything) - len(set(everything)) == 2
    # exact shares (a pass summed over ranks, as the statistics): each sample once, in order
    shares = [_indices(StreamingLoader(fset, 4, shuffle=False, run_chunks=2, rank=r, world_size=4, exact_shares=True))
              for r in range(4)]
    assert [len(s) for s in shares] == [7, 8, 7, 8] and [i for s in shares for i in s] == list(range(30))


OLD_CODEC = BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")  # what stores were written with before


def _recode(built, dest: Path, **spec) -> Path:
    """A copy of the test store whose x arrays are written again with another codec or
    layout (zarr's create_array arguments); the values, manifest and key stay the same."""
    store, key = built
    shutil.copytree(store, dest)
    for fold in ("1", "2"):
        parent = zarr.open_group(str(dest / "folder" / key / f"fold-{fold}"), mode="r+")
        values, chunks = parent["x"][:], parent["x"].chunks
        del parent["x"]
        parent.create_array("x", shape=values.shape, chunks=chunks, dtype=values.dtype, fill_value=0, **spec)[:] = values
    return dest


@pytest.mark.parametrize("layout, spec, direct", [
    ("store default", None, True),
    ("old codec", {"compressors": OLD_CODEC}, True),
    ("uncompressed", {"compressors": None}, True),
    ("gzip (through zarr)", {"compressors": GzipCodec(level=1)}, False),
    ("sharded (through zarr)", {"shards": (2 * CHUNK, 3, 128, 20)}, False),
])
def test_streaming_serves_the_same_values_from_every_layout(built, expected, tmp_path, layout, spec, direct):
    store = built[0] if spec is None else _recode(built, tmp_path / "store", **spec)
    fset = open_foldset(str(store), "folder", built[1], ["1", "2"])
    loader = StreamingLoader(fset, 8, seed=5, run_chunks=1, buffer_chunks=2)
    # the store's own layouts are read by the reader itself, anything else through zarr
    assert (loader._reader(0).directory is not None) == direct
    assert sorted(_stream_check(loader, expected, 30)) == list(range(30))
    assert torch.equal(load_in_memory(fset).x, torch.from_numpy(expected[0]))  # decoded in place where it can
    assert torch.equal(load_in_memory(fset, run_bytes=1, threads=3).x, torch.from_numpy(expected[0]))
    # the order depends on the seed only, not on the codec or the path the bytes took
    assert _indices(StreamingLoader(fset, 8, seed=5, run_chunks=1, buffer_chunks=2)) == \
        _indices(StreamingLoader(open_foldset(str(built[0]), "folder", built[1], ["1", "2"]), 8, seed=5,
                                 run_chunks=1, buffer_chunks=2))


def test_chunk_reader_matches_zarr_and_refuses_damaged_chunks(built, tmp_path):
    store = _recode(built, tmp_path / "store", compressors=OLD_CODEC)
    xdir = store / "folder" / built[1] / "fold-2" / "x"
    reader = ChunkReader(zarr.open_group(str(xdir.parent), mode="r").store, "x")
    arr = reader.array
    n = arr.shape[0]
    assert n % CHUNK and reader.directory == xdir  # the fold ends in a short chunk
    ranges = [(0, n), (1, 3), (3, 9), (CHUNK, 2 * CHUNK), (n - 2, n), (5, 6)]
    for a, b in ranges:
        assert np.array_equal(reader.read(a, b), arr[a:b]), (a, b)
    # a chunk zarr never wrote (it held only the fill value) reads as the fill value, as in zarr
    (xdir / "c" / "1" / "0" / "0" / "0").unlink()
    assert np.array_equal(reader.read(0, n), arr[:]) and not reader.read(CHUNK, 2 * CHUNK).any()
    # a truncated chunk file is an error that names it, never garbage or a crash
    chunk = xdir / "c" / "2" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(StoreError, match=r"damaged chunk .*c/2/0/0/0: Blosc header says \d+ bytes in \d+, file holds 100"):
        reader.read(2 * CHUNK, 3 * CHUNK)
    raw = _recode(built, tmp_path / "raw", compressors=None) / "folder" / built[1] / "fold-2" / "x"
    (raw / "c" / "0" / "0" / "0" / "0").write_bytes(b"\0" * 10)
    with pytest.raises(StoreError, match="damaged chunk .* 10 bytes, expected"):
        ChunkReader(zarr.open_group(str(raw.parent), mode="r").store, "x").read(0, 2)


def test_the_door_chooses_the_loader_by_budget(built, expected):
    store, key = built
    fset = open_foldset(str(store), "folder", key, ["1", "2"])
    raw = fset.raw_bytes()
    assert raw == 31 * 3 * 128 * 20 * 2
    inputs = open_inputs([fset], memory_budget_gb=1000 / 1e9)
    loader, mode = inputs.folds(fset.folds).loader(8), inputs.mode.mode
    assert mode == "streaming" and isinstance(loader, StreamingLoader)
    assert sorted(_indices(loader)) == list(range(30))
    inputs = open_inputs([fset], memory_budget_gb=raw / 1e9)
    loader, mode = inputs.folds(fset.folds).loader(8, seed=9), inputs.mode.mode
    assert mode == "memory" and isinstance(loader, InMemoryLoader) and loader.seed == 9
    assert sorted(_indices(loader)) == list(range(30))
    assert open_inputs([fset]).mode.mode == "memory"  # default budget: half of MemAvailable


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loaders_on_cuda(built, expected):
    store, key = built
    fset = open_foldset(str(store), "folder", key, ["1", "2"])
    data = load_in_memory(fset, device="cuda")
    assert data.x.is_cuda and torch.equal(data.x.cpu(), torch.from_numpy(expected[0]))
    for loader in (InMemoryLoader(data, 8, seed=1), StreamingLoader(fset, 8, seed=1, device="cuda")):
        batches = list(loader)
        assert all(b.x.is_cuda and b.y.is_cuda and b.index.is_cuda for b in batches)
        _stream_check([type(b)(b.x.cpu(), b.y.cpu(), b.index.cpu()) for b in batches], expected, 30)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = data.x[:6].float()
    out = Augment(spec_augment=True, time_crop=16, time_shift=3, mixup=0.2, n_classes=3)(x, data.y[:6], g)
    assert out[0].is_cuda and out[0].shape == (6, 3, 128, 16) and out[1].shape == (6, 3)
    cpu_gen = torch.Generator().manual_seed(0)  # a CPU generator works for a CUDA batch too
    assert spec_augment(x, generator=cpu_gen).is_cuda


def test_multilabel_targets(tmp_path):
    root = L.make_fsd50k(tmp_path / "fsd")
    summary = _extract("fsd50k", root, tmp_path / "store")
    fset = open_foldset(str(tmp_path / "store"), "fsd50k", summary.key, ["train", "eval"])
    data = load_in_memory(fset)
    assert data.y.dtype == torch.bool and data.y.shape == (5, 6) and data.multilabel  # 3 train + 2 eval, 6 labels
    batch = next(iter(InMemoryLoader(data, 5, shuffle=False)))
    assert batch.y.dtype == torch.float32 and torch.equal(batch.y, data.y.float())
    streamed = next(iter(StreamingLoader(fset, 5, shuffle=False)))
    assert torch.equal(streamed.y, batch.y) and torch.equal(streamed.x, batch.x)
    _, y = mixup(batch.x, batch.y, alpha=0.4, generator=torch.Generator().manual_seed(0))
    assert y.shape == (5, 6) and float(y.min()) >= 0 and float(y.max()) <= 1


# -- augmentations ---------------------------------------------------------------------------

def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(b: int = 6, c: int = 3, f: int = 64, t: int = 100) -> torch.Tensor:
    return torch.randn(b, c, f, t, generator=_gen(123)) * 3 - 10


def test_spec_augment_masks_bands_with_the_sample_mean():
    x = _batch()
    out = spec_augment(x, time_masks=2, time_width=20, freq_masks=2, freq_width=16, generator=_gen(1))
    assert out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(x, _batch())  # input untouched
    fill = x.mean(dim=(2, 3), keepdim=True)
    masked = out == fill  # random normal values never equal the mean exactly
    changed = out != x
    assert torch.equal(masked, changed)
    # a masked time column is masked at every bin and channel, a masked bin at every frame
    tcols = masked.all(dim=2).all(dim=1)  # (B, T)
    fbins = masked.all(dim=3).all(dim=1)  # (B, F)
    assert torch.equal(changed, (tcols[:, None, None, :] | fbins[:, None, :, None]).expand_as(changed))
    assert (tcols.sum(dim=1) <= 40).all() and (fbins.sum(dim=1) <= 32).all()
    assert tcols.sum() > 0 and fbins.sum() > 0
    assert len({tuple(tcols[i].nonzero().flatten().tolist()) for i in range(6)}) > 1  # per sample
    assert torch.equal(out, spec_augment(x, generator=_gen(1)))
    assert not torch.equal(out, spec_augment(x, generator=_gen(2)))
    none = spec_augment(x, time_masks=0, freq_masks=0, generator=_gen(1))
    assert torch.equal(none, x)
    full = spec_augment(x, time_masks=1, time_width=100, freq_masks=0, generator=_gen(1))
    assert full.shape == x.shape  # width capped at the frame count


def test_time_crop_and_shift():
    x = _batch()
    crop = random_time_crop(x, 30, generator=_gen(1))
    assert crop.shape == (6, 3, 64, 30)
    offsets = []
    for i in range(6):
        hits = [o for o in range(71) if torch.equal(crop[i], x[i, :, :, o:o + 30])]
        assert len(hits) == 1
        offsets.append(hits[0])
    assert len(set(offsets)) > 1
    assert torch.equal(crop, random_time_crop(x, 30, generator=_gen(1)))
    with pytest.raises(ValueError):
        random_time_crop(x, 101)
    shifted = random_time_shift(x, 10, generator=_gen(1))
    shifts = []
    for i in range(6):
        hits = [s for s in range(-10, 11) if torch.equal(shifted[i], torch.roll(x[i], s, dims=-1))]
        assert len(hits) == 1
        shifts.append(hits[0])
    assert len(set(shifts)) > 1
    assert torch.equal(shifted, random_time_shift(x, 10, generator=_gen(1)))


def _shifted_bins(x: torch.Tensor, s: int) -> torch.Tensor:
    """x moved s bins up the frequency axis, the bins shifted in repeating the edge bin."""
    f = x.shape[-2]
    return x[..., [min(max(i - s, 0), f - 1) for i in range(f)], :]


def test_frequency_shift_moves_each_sample_by_its_own_bins_and_repeats_the_edge():
    x = _batch(b=6)
    shifted = random_freq_shift(x, 4, generator=_gen(2))
    shifts = []
    for i in range(6):
        hits = [s for s in range(-4, 5) if torch.equal(shifted[i], _shifted_bins(x[i], s))]
        assert len(hits) == 1
        shifts.append(hits[0])
    assert len(set(shifts)) > 1  # per sample, not one shift for the batch
    assert torch.equal(shifted, random_freq_shift(x, 4, generator=_gen(2)))
    assert torch.equal(random_freq_shift(x, 0), x) and Augment(freq_shift=3).changes(x.shape[-1])


def test_resized_crop_stretches_a_region_of_each_sample_back_to_the_whole():
    # A ramp along time (and another along the bins): a crop of a share s resized back is a
    # ramp of slope s, starting inside the original; each sample has its own shares.
    t, f = torch.arange(40.0), torch.arange(24.0)
    x = (t.view(1, 1, 1, 40) + 100 * f.view(1, 1, 24, 1)).expand(8, 2, 24, 40).contiguous()
    y = random_resized_crop(x, 0.5, generator=_gen(3))
    assert y.shape == x.shape and torch.equal(y[:, 0], y[:, 1])  # channels cropped alike
    time_steps = y[:, 0, 5, 10:30].diff(dim=-1)  # inside: away from the clamped borders
    bin_steps = y[:, 0, 5:19, 3].diff(dim=-1) / 100
    for steps in (time_steps, bin_steps):
        slope = steps.mean(dim=-1)
        assert torch.allclose(steps, slope.view(-1, 1).expand_as(steps), atol=2e-3)  # a linear stretch
        assert (slope >= 0.5 - 1e-4).all() and (slope <= 1 + 1e-4).all() and slope.std() > 0.01
    assert y.min() >= x.min() and y.max() <= x.max()
    assert torch.equal(y, random_resized_crop(x, 0.5, generator=_gen(3)))
    assert torch.equal(random_resized_crop(x, 1.0), x)
    assert Augment(resized_crop=0.6).changes() and not Augment(resized_crop=1.0).changes()


def test_level_and_equaliser_add_one_smooth_curve_per_sample_in_db():
    # 7 bands over 37 bins: centres every 6 bins, so the curve is linear on each stretch of 6
    x = _batch(b=16, c=3, f=37, t=20)
    per_db = torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1)  # a channel's units per dB
    out = random_level_eq(x, gain_db=10, eq_db=6, per_db=per_db, generator=_gen(4))
    db = (out - x) / per_db  # back in dB: the same curve in every channel and frame
    curve = db[:, 0, :, 0]
    assert torch.allclose(db, curve.view(16, 1, 37, 1).expand_as(db), atol=1e-4)
    for start in range(0, 36, 6):  # linear between the centres (second differences vanish)
        assert torch.allclose(curve[:, start:start + 7].diff(n=2, dim=-1), torch.zeros(16, 5), atol=1e-4)
    assert curve.abs().max() <= 16 + 1e-4 and curve.std(dim=1).min() > 0.1  # level + equaliser, not flat
    assert curve.mean(dim=1).std() > 1  # each sample its own level
    level = random_level_eq(x, gain_db=10, eq_db=0, generator=_gen(4)) - x  # the level alone: flat
    assert torch.allclose(level, level[:, :1, :1, :1].expand_as(level), atol=1e-5)
    assert level.abs().max() <= 10 and level[:, 0, 0, 0].std() > 1
    assert torch.equal(out, random_level_eq(x, 10, 6, per_db, generator=_gen(4)))
    assert torch.equal(random_level_eq(x, 0, 0), x)
    assert Augment(gain_db=3).changes() and Augment(eq_db=3).changes() and not Augment().changes()


def test_mixup_targets_are_the_weights_used():
    x = _batch(b=8)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    xm, ys, lam, perm = mixup(x, y, alpha=0.4, n_classes=4, generator=_gen(7), return_weights=True)
    assert xm.shape == x.shape and ys.shape == (8, 4) and ys.dtype == torch.float32
    assert torch.allclose(ys.sum(dim=1), torch.ones(8))
    assert lam.shape == (8,) and ((lam > 0) & (lam < 1)).all() and len(set(lam.tolist())) == 8
    for i in range(8):
        j = int(perm[i])
        assert torch.allclose(xm[i], lam[i] * x[i] + (1 - lam[i]) * x[j], atol=1e-5)
        if y[i] != y[j]:
            assert ys[i, y[i]] == pytest.approx(float(lam[i])) and ys[i, y[j]] == pytest.approx(1 - float(lam[i]))
        else:
            assert ys[i, y[i]] == pytest.approx(1.0)
    again = mixup(x, y, alpha=0.4, n_classes=4, generator=_gen(7))
    assert torch.equal(again[0], xm) and torch.equal(again[1], ys)
    multi = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    _, ys2, lam2, perm2 = mixup(x[:2], multi, generator=_gen(3), return_weights=True)
    expect = lam2[:, None] * multi.float() + (1 - lam2[:, None]) * multi.float()[perm2]
    assert torch.allclose(ys2, expect)
    with pytest.raises(ValueError, match="n_classes"):
        mixup(x, y)


def test_augment_config():
    x, y = _batch(), torch.tensor([0, 1, 2, 0, 1, 2])
    off = Augment()
    assert not off.active
    same_x, same_y = off(x, y, _gen())
    assert torch.equal(same_x, x) and torch.equal(same_y, y)
    aug = Augment(spec_augment=True, time_crop=80, time_shift=5, mixup=0.2, n_classes=3)
    ax, ay = aug(x, y, _gen(4))
    assert aug.active and ax.shape == (6, 3, 64, 80) and ay.shape == (6, 3)
    bx, by = aug(x, y, _gen(4))
    assert torch.equal(ax, bx) and torch.equal(ay, by)


def test_subset_of_one_run_of_rows_is_a_view_and_of_several_a_copy():
    x = torch.arange(24, dtype=torch.float16).view(6, 1, 2, 2)
    data = InMemoryData(x=x, y=torch.arange(6), index=torch.arange(6), clips=[f"c{i}" for i in range(6)],
                        fold_of=["1", "1", "2", "2", "3", "3"])
    folds = np.array(data.fold_of)
    test = subset(data, torch.from_numpy(folds == "2"))  # a test fold: no second copy of its rows
    assert test.x.data_ptr() == x[2].data_ptr() and torch.equal(test.x, x[2:4])
    assert test.clips == ["c2", "c3"] and test.fold_of == ["2", "2"] and test.y.tolist() == [2, 3]
    train = subset(data, torch.from_numpy(folds != "2"))  # the folds around it: copied
    assert train.x.data_ptr() != x.data_ptr() and torch.equal(train.x, x[[0, 1, 4, 5]])
    assert train.index.tolist() == [0, 1, 4, 5] and train.clips == ["c0", "c1", "c4", "c5"]
    assert len(subset(data, torch.zeros(6, dtype=torch.bool))) == 0
