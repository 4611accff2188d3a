"""The audiofx command line. Thin: parse, call one function, print a summary.

User errors (AudiofxError) become one line on stderr with a hint and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from audiofx import __version__
from audiofx.config import PRESETS, parse_overrides
from audiofx.errors import AudiofxError, StoreError


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="audiofx")
def cli() -> None:
    """audiofx: cached three-window log-mel features for transfer and self-supervised
    learning on sound.

    \b
    Quick start (offline, synthetic demo data):
      audiofx extract --dataset demo
      audiofx pretrain --method npid --datasets demo --arch tiny --epochs 10
      audiofx finetune --dataset demo --init npid --epochs 6 --lr 1e-3
      audiofx evaluate --run npid --dataset demo --mode knn
    """


EXTRACT_EXAMPLE = """
\b
Examples:
  audiofx extract --dataset esc50 --root /data/ESC-50-master
  audiofx extract --dataset gtzan --workers 2 --set n_mels=64
  audiofx extract --dataset urbansound8k --preset palanisamy2020 --allow-missing
  audiofx extract --dataset folder --root my_sounds --set folds=5
"""


@cli.command(epilog=EXTRACT_EXAMPLE)
@click.option("--dataset", required=True, help="Dataset name (audiofx datasets lists them).")
@click.option("--root", type=click.Path(path_type=Path), help="Dataset root in its official layout [data/raw/<dataset>].")
@click.option("--store", default="data/features", show_default=True, help="Feature store directory.")
@click.option("--preset", default="shin2021", show_default=True, help=f"Feature recipe: {', '.join(PRESETS)}.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a feature option (n_mels=64, hops_ms=10,25,50) or a dataset option (folds=5, seed=1).")
@click.option("--split", type=click.Path(path_type=Path), help="CSV of path,fold with a published split (gtzan, folder).")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="Worker processes [0: one per core].")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda: where features are computed.")
@click.option("--strict", is_flag=True, help="Stop at the first unusable file instead of recording it as skipped.")
@click.option("--allow-missing", is_flag=True, help="Go on when files listed in the metadata are missing (recorded).")
@click.option("--rebuild", is_flag=True, help="Replace a store built from a different copy of the dataset.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def extract(dataset, root, store, preset, overrides, split, workers, device, strict, allow_missing, rebuild, no_progress):
    """Decode, resample and turn every clip of a dataset into three-window log-mel features,
    written in parallel into a resumable Zarr feature store."""
    from audiofx.pipeline.extract import ExtractRequest
    from audiofx.pipeline.extract import extract as run_extract

    values = parse_overrides(overrides)
    if split is not None:
        values["split"] = str(split.resolve())
    summary = run_extract(ExtractRequest(
        dataset=dataset, root=root, store=store, preset=preset, overrides=values, workers=workers, device=device,
        strict=strict, allow_missing=allow_missing, rebuild=rebuild, progress=not no_progress,
    ))
    if summary.status == "complete":
        click.echo(f"store is complete: {summary.path} ({summary.clips_total} clips); nothing to do")
        return
    click.echo(f"extracted {summary.dataset} -> {summary.path}")
    resumed = f", {summary.units_done_before} of {summary.units_total} units were already done" if summary.units_done_before else ""
    click.echo(f"  clips: {summary.clips_ok} usable of {summary.clips_total}; {summary.clips_written} computed in this run{resumed}")
    click.echo(f"  time: {summary.seconds:.1f} s, {summary.clips_per_second:.1f} clips/s")
    click.echo(f"  store: {_size(summary.stored_bytes)} on disk, compression {summary.compression_ratio:.2f}x")
    if summary.missing:
        click.echo(f"  missing (allowed): {len(summary.missing)}, e.g. {summary.missing[0]}")
    if summary.skipped:
        click.echo(f"  skipped: {len(summary.skipped)}")
        for clip, reason in summary.skipped:
            click.echo(f"    {clip}: {reason}")


@cli.command()
def datasets():
    """List the dataset adapters and the layout each expects."""
    from audiofx.pipeline.datasets import REGISTRY

    for name in sorted(REGISTRY):
        a = REGISTRY[name]
        click.echo(f"{name:13s} {a.description}")
        click.echo(f"{'':13s} layout: {a.layout}")


@cli.group()
def cache():
    """Inspect and check the feature store."""


@cache.command("ls")
@click.option("--store", default="data/features", show_default=True)
def cache_ls(store):
    """Datasets, keys, folds, clip counts, sizes and creation times in a store."""
    from audiofx.pipeline.store import FeatureStore, dir_bytes

    fs = FeatureStore(store)
    rows = []
    for ds, key, path in fs.groups():
        try:
            m = fs.read_manifest(ds, key)
            rows.append((ds, key, str(len(m["folds"])), str(m["clips"]), _size(m["sizes"]["stored_bytes"]), m["created_at"], "complete"))
        except StoreError:
            rows.append((ds, key, "-", "-", _size(dir_bytes(path)), "-", "incomplete"))
    if not rows:
        click.echo(f"no feature sets in {fs.root} (make one with: audiofx extract --dataset demo)")
        return
    header = ("dataset", "key", "folds", "clips", "size", "created", "status")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


@cache.command("info")
@click.argument("key")
@click.option("--store", default="data/features", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest.")
def cache_info(key, store, as_json):
    """Everything about one feature set (KEY: a key prefix or dataset/key)."""
    from audiofx.pipeline.store import FeatureStore

    fs = FeatureStore(store)
    ds, full = fs.find(key)
    m = fs.read_manifest(ds, full)
    if as_json:
        click.echo(json.dumps(m, indent=1))
        return
    click.echo(f"{ds}/{full}  ({fs.group_path(ds, full)})")
    click.echo(f"  created {m['created_at']} by audiofx {m['audiofx_version']}, feature code v{m['feature_code_version']}")
    click.echo(f"  shape per clip {tuple(m['shape'])} {m['feature_config']['dtype']}, {len(m['classes'])} classes"
               f"{' (multi-label)' if m['multilabel'] else ''}")
    for fold, f in m["folds"].items():
        click.echo(f"  fold {fold}: {f['ok']} clips" + (f" ({f['skipped']} skipped)" if f["skipped"] else ""))
    cfg = m["feature_config"]
    click.echo("  config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    if m["dataset_options"]:
        click.echo("  dataset options: " + ", ".join(f"{k}={v}" for k, v in m["dataset_options"].items()))
    click.echo(f"  dataset fingerprint: {m['fingerprint']['files']} files, {_size(m['fingerprint']['bytes'])}, {m['fingerprint']['digest'][:16]}")
    click.echo(f"  size: {_size(m['sizes']['stored_bytes'])} stored, {_size(m['sizes']['raw_bytes'])} raw")
    for s in m["skipped"]:
        click.echo(f"  skipped {s['clip']}: {s['reason']}")
    for miss in m["missing"]:
        click.echo(f"  missing {miss}")


@cache.command("verify")
@click.argument("key", required=False)
@click.option("--store", default="data/features", show_default=True)
def cache_verify(key, store):
    """Recompute every checksum and name each damaged chunk or array."""
    from audiofx.pipeline.store import FeatureStore

    fs = FeatureStore(store)
    targets = [fs.find(key)] if key else [(d, k) for d, k, _ in fs.groups()]
    if not targets:
        raise StoreError(f"no feature sets in {fs.root}", "check --store")
    damaged = 0
    for ds, k in targets:
        problems = fs.verify(ds, k)
        if problems:
            damaged += 1
            for p in problems:
                click.echo(f"DAMAGED {p}")
        else:
            click.echo(f"ok {ds}/{k}")
    if damaged:
        raise AudiofxError(f"{damaged} of {len(targets)} feature sets are damaged",
                           "re-extract them with --rebuild")


def _main_rank() -> bool:
    """Under torchrun only rank 0 prints the closing summary."""
    import os

    return os.environ.get("RANK", "0") == "0"


TRAIN_EXAMPLE = """
\b
Examples:
  audiofx pretrain --method npid --datasets esc50,urbansound8k --epochs 200
  audiofx pretrain --method simclr --arch resnet18 --epochs 100 --batch-size 128
"""


@cli.command(epilog=TRAIN_EXAMPLE)
@click.option("--method", required=True, help="npid, simclr or moco.")
@click.option("--datasets", default="", help="Comma-separated datasets for the unlabeled pool [every dataset in the store].")
@click.option("--store", default="data/features", show_default=True)
@click.option("--preset", default="shin2021", show_default=True, help="Which extracted features to use.")
@click.option("--arch", default="resnet50", show_default=True, help="resnet18/34/50, densenet201, vgg16, alexnet, tiny.")
@click.option("--epochs", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=None, help="SGD learning rate [the method's default].")
@click.option("--nce-k", type=click.IntRange(min=0), default=64, show_default=True, help="NPID noise samples (0: full softmax).")
@click.option("--temperature", type=float, default=None, help="[NPID 0.4, SimCLR 0.5, MoCo 0.2]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--runs", "runs_root", default="data/runs", show_default=True, help="Where run folders go.")
@click.option("--name", default=None, help="Run name [method-arch-time].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (give its --name).")
@click.option("--no-progress", is_flag=True)
def pretrain(method, datasets, store, preset, arch, epochs, batch_size, lr, nce_k, temperature, seed, device, runs_root,
             name, resume, no_progress):
    """Learn a representation without labels from the cached features (NPID, SimCLR, MoCo v2)."""
    from audiofx.training.pretrain import PretrainConfig
    from audiofx.training.pretrain import pretrain as run_pretrain

    result = run_pretrain(PretrainConfig(
        method=method, datasets=tuple(d for d in datasets.split(",") if d), store=store, preset=preset, arch=arch,
        epochs=epochs, batch_size=batch_size, lr=lr, nce_k=nce_k, temperature=temperature, seed=seed, device=device,
        runs_root=runs_root, name=name, resume=resume, progress=not no_progress), say=click.echo)
    if _main_rank():
        click.echo(f"pretrained {method}: {result['run']} (final loss {result['loss']:.4f})")


FINETUNE_EXAMPLE = """
\b
Examples:
  audiofx finetune --dataset esc50 --init imagenet --fold all
  audiofx finetune --dataset gtzan --init simclr --epochs 70 --batch-size 32 --lr 1e-4
  audiofx finetune --dataset urbansound8k --init npid:npid-resnet50-20261121-101500 --fold 3
"""


@cli.command(epilog=FINETUNE_EXAMPLE)
@click.option("--dataset", required=True)
@click.option("--init", default="scratch", show_default=True, help="scratch, imagenet, simclr, npid, moco, METHOD:RUN or a PATH.")
@click.option("--weights", default=None, help="ImageNet checkpoint file (for --init imagenet offline).")
@click.option("--store", default="data/features", show_default=True)
@click.option("--preset", default="shin2021", show_default=True)
@click.option("--key", default=None, help="A feature key (prefix), when several feature sets match.")
@click.option("--arch", default=None, help="[resnet50, or the pretrain run's arch]")
@click.option("--fold", default="all", show_default=True, help="all, or one test fold.")
@click.option("--epochs", type=click.IntRange(min=1), default=70, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--weight-decay", type=float, default=1e-3, show_default=True)
@click.option("--spec-augment", is_flag=True, help="SpecAugment time and frequency masks.")
@click.option("--time-shift", type=int, default=0, help="Random circular time shift of up to N frames.")
@click.option("--mixup", type=float, default=0.0, help="Mixup with Beta(a, a); 0 is off.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--runs", "runs_root", default="data/runs", show_default=True)
@click.option("--name", default=None)
@click.option("--resume", is_flag=True)
@click.option("--no-progress", is_flag=True)
def finetune(dataset, init, weights, store, preset, key, arch, fold, epochs, batch_size, lr, weight_decay, spec_augment,
             time_shift, mixup, seed, device, runs_root, name, resume, no_progress):
    """Fine-tune a classifier with k-fold cross-validation on the official folds."""
    from audiofx.training.augment import Augment
    from audiofx.training.finetune import FinetuneConfig
    from audiofx.training.finetune import finetune as run_finetune

    s = run_finetune(FinetuneConfig(
        dataset=dataset, init=init, weights=weights, store=store, preset=preset, key=key, arch=arch, fold=fold,
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        augment=Augment(spec_augment=spec_augment, time_shift=time_shift, mixup=mixup), seed=seed, device=device,
        runs_root=runs_root, name=name, resume=resume, progress=not no_progress), say=click.echo)
    if not _main_rank():
        return
    click.echo(f"accuracy over {s['n_folds']} fold(s): last epoch {100 * s['last_acc_mean']:.2f} ± "
               f"{100 * s['last_acc_std']:.2f}%, best epoch {100 * s['best_acc_mean']:.2f} ± "
               f"{100 * s['best_acc_std']:.2f}% (selected on the test fold); {s['run']}/summary.md")


@cli.command("evaluate")
@click.option("--run", "run_spec", required=True, help="A pretrain run: npid, simclr, moco (newest), METHOD:RUN or a PATH.")
@click.option("--dataset", required=True)
@click.option("--mode", default="knn", show_default=True, help="knn or linear.")
@click.option("--fold", default="all", show_default=True)
@click.option("--store", default="data/features", show_default=True)
@click.option("--preset", default="shin2021", show_default=True)
@click.option("--key", default=None)
@click.option("--k", "k", type=click.IntRange(min=1), default=200, show_default=True, help="kNN neighbours (k by CV is also reported).")
@click.option("--epochs", "linear_epochs", type=click.IntRange(min=1), default=100, show_default=True, help="Linear probe epochs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--runs", "runs_root", default="data/runs", show_default=True)
@click.option("--name", default=None)
def evaluate_cmd(run_spec, dataset, mode, fold, store, preset, key, k, linear_epochs, seed, device, runs_root, name):
    """Frozen-encoder evaluation: linear probe or weighted kNN, per fold."""
    from audiofx.training.evaluate import EvaluateConfig, evaluate

    s = evaluate(EvaluateConfig(run=run_spec, dataset=dataset, mode=mode, fold=fold, store=store, preset=preset, key=key,
                                k=k, linear_epochs=linear_epochs, seed=seed, device=device, runs_root=runs_root, name=name),
                 say=click.echo)
    click.echo(f"{mode} accuracy over {s['n_folds']} fold(s): {100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f}%; "
               f"{s['run']}/summary.md")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
def compare(runs):
    """A table of finetune and evaluate runs: mean ± std accuracy over folds."""
    from audiofx.training.compare import compare_table

    click.echo(compare_table(list(runs)))


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="audiofx", standalone_mode=False)
    except AudiofxError as err:
        click.echo(err.one_line(), err=True)
        sys.exit(err.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("interrupted: finished write units are kept; rerun the same command to finish", err=True)
        sys.exit(130)
    except click.ClickException as err:
        # Usage errors too (a bad value, a missing option): one line, like every user error.
        ctx = getattr(err, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        click.echo(f"error: {' '.join(err.format_message().split())}{hint}", err=True)
        sys.exit(err.exit_code)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
