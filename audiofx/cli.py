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
from audiofx.recipes import RECIPES


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


STORE_HELP = "Feature store: a directory, or an fsspec URL (s3://bucket/prefix, gs://..., file://...)."


def store_option(f):
    return click.option("--store", default="data/features", show_default=True, help=STORE_HELP)(f)


def set_option(f):
    """--set on a training stage: which stored set, by the --set values extract was given."""
    return click.option("--set", "set_options", multiple=True, metavar="KEY=VALUE",
                        help="The stored set extract made with this --set (a protocol: folds=2, ratios=70/15/15; "
                             "or a feature option: n_mels=64) [the preset at the dataset's default options].")(f)


def input_channel_option(f):
    """--input-channel on finetune and evaluate: one stored channel as the network's input."""
    return click.option("--input-channel", default=None, metavar="SOURCE|INDEX",
                        help="One stored channel alone as the network's input, repeated on its 3 input channels: a "
                             "source (left, right, mid: Zhou et al.'s average channel) or an index from 0 [the "
                             "stack as stored; a one-channel set is repeated].")(f)


def run_options(resume_help: str | None = None):
    """The options of a stage's run (runs.StageOptions): --memory-budget, --seed, --device,
    --runs, --name; and, for the training stages (resume_help given), --resume and
    --no-progress."""
    options = [
        click.option("--memory-budget", "memory_budget", type=click.FloatRange(min=0), default=None, metavar="GB",
                     help="Keep the features in memory when their raw size fits in GB, else stream them from the "
                          "store; 0 always streams [half of the free memory where the data would live]."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
        click.option("--runs", "runs_root", default="data/runs", show_default=True, help="Where run folders go."),
        click.option("--name", default=None, help="Run name [made of the settings and the time]."),
    ]
    if resume_help:
        options += [click.option("--resume", is_flag=True, help=resume_help),
                    click.option("--no-progress", is_flag=True, help="No progress bars.")]

    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


def _set_cache(ctx, param, value):
    """Applied while the options are parsed, so commands need no extra parameters."""
    if value is not None:
        from audiofx.pipeline.readcache import configure

        configure(**{"root" if param.name == "cache_dir" else "limit": value})
    return value


INIT_HELP = ("scratch; imagenet, imagenet-simclr, imagenet-moco (ImageNet weights: torchvision's supervised, "
             "SimCLR's, MoCo v2's; --weights FILE or the torch cache); a method ({methods}: its newest run); "
             "METHOD:RUN; a pretrain run's name or folder; or a checkpoint PATH of any common layout "
             "(torchvision, timm, MoCo, SimCLR, DINO, BYOL, SwAV, solo-learn, lightly, Lightning, audiofx).")


def weights_options(f):
    """--weights and --init-branch: the file behind a named init, and which of a checkpoint's
    two networks to take."""
    f = click.option("--init-branch", type=click.Choice(["auto", "online", "momentum"]), default="auto",
                     show_default=True,
                     help="A checkpoint with two networks: online (MoCo's query encoder, DINO's student...) or "
                          "momentum (MoCo's key encoder, DINO's teacher, an EMA); auto takes the one its paper "
                          "evaluates (DINO: teacher; the others: online).")(f)
    return click.option("--weights", default=None,
                        help="The checkpoint FILE of imagenet, imagenet-simclr or imagenet-moco (offline: nothing "
                             "is downloaded) [the torch hub cache].")(f)


def read_cache_options(f):
    """--cache-dir / --cache-size: where reads of a remote store are cached locally."""
    f = click.option("--cache-size", default=None, metavar="SIZE", expose_value=False, callback=_set_cache,
                     help="Limit of the read-through cache, e.g. 50GB [$AUDIOFX_CACHE_SIZE or 50GB].")(f)
    return click.option("--cache-dir", default=None, type=click.Path(path_type=Path), expose_value=False,
                        callback=_set_cache,
                        help="Local read-through cache of remote stores "
                             "[$AUDIOFX_CACHE_DIR or ${XDG_CACHE_HOME:-~/.cache}/audiofx/features].")(f)


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
  audiofx extract --dataset esc50 --root /shared/ESC-50-master --store /shared/features --scheduler tcp://head:8786
"""


@cli.command(epilog=EXTRACT_EXAMPLE)
@click.option("--dataset", required=True, help="Dataset name (audiofx datasets lists them).")
@click.option("--root", type=click.Path(path_type=Path), help="Dataset root in its official layout [data/raw/<dataset>].")
@store_option
@click.option("--preset", default="shin2021", show_default=True, help=f"Feature recipe: {', '.join(PRESETS)}.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a feature option (n_mels=64, hops_ms=10,25,50) or a dataset option (folds=5, seed=1).")
@click.option("--split", type=click.Path(path_type=Path), help="CSV of path,fold with a published split (gtzan, folder).")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="Worker processes [0: one per core].")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda: where features are computed.")
@click.option("--scheduler", metavar="local:N|tcp://HOST:PORT",
              help="Run on Dask instead of joblib: N local worker processes, or a running cluster's scheduler "
                   "(its workers must see --root and --store at the same paths; see docs/scaling.md).")
@click.option("--strict", is_flag=True, help="Stop at the first unusable file instead of recording it as skipped.")
@click.option("--allow-missing", is_flag=True, help="Go on when files listed in the metadata are missing (recorded).")
@click.option("--rebuild", is_flag=True, help="Replace a store built from a different copy of the dataset.")
@click.option("--fingerprint", type=click.Choice(["sizes", "content"]), default="sizes", show_default=True,
              help="What tells a changed dataset: every file's path and size, or also its content (sha256 of "
                   "every file: for datasets whose files are edited in place).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--download", "fetch_first", is_flag=True,
              help="Download the dataset first when its root is missing (as audiofx download does).")
def extract(dataset, root, store, preset, overrides, split, workers, device, scheduler, strict, allow_missing, rebuild,
            fingerprint, no_progress, fetch_first):
    """Decode, resample and turn every clip of a dataset into three-window log-mel features,
    written in parallel into a resumable Zarr feature store."""
    from audiofx.pipeline.extract import ExtractRequest
    from audiofx.pipeline.extract import extract as run_extract

    if fetch_first:  # only when the root is missing or empty; extract checks a present one itself
        from audiofx.pipeline.download import fetch_missing

        fetched = fetch_missing(dataset, root, progress=not no_progress, say=click.echo)
        if fetched is not None:
            click.echo(_downloaded(fetched))
    values = parse_overrides(overrides)
    if split is not None:
        values["split"] = str(split.resolve())
    summary = run_extract(ExtractRequest(
        dataset=dataset, root=root, store=store, preset=preset, overrides=values, workers=workers, device=device,
        strict=strict, allow_missing=allow_missing, rebuild=rebuild, progress=not no_progress, scheduler=scheduler,
        fingerprint=fingerprint,
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


DOWNLOAD_EXAMPLE = """
\b
Examples:
  audiofx download esc50                               # -> data/raw/esc50
  audiofx download urbansound8k --root /data/UrbanSound8K
  audiofx download gtzan --mirror http://mirror.lab:8000
  audiofx download fsd50k --list                       # the files, URLs and md5s, to fetch by hand
"""


@cli.command("download", epilog=DOWNLOAD_EXAMPLE)
@click.argument("dataset")
@click.option("--root", type=click.Path(path_type=Path), help="Where the dataset goes [data/raw/<dataset>].")
@click.option("--mirror", metavar="URL",
              help="Base URL that replaces every file's scheme and host [$AUDIOFX_DOWNLOAD_MIRROR].")
@click.option("--keep-archives", is_flag=True, help="Keep the archives (in <root>/../downloads) after the check.")
@click.option("--list", "list_only", is_flag=True, help="Only print the files, their URLs and checksums.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def download_cmd(dataset, root, mirror, keep_archives, list_only, no_progress):
    """Fetch DATASET (esc50, esc10, urbansound8k, gtzan, fsd50k, tau2019) from its official
    location, resuming interrupted transfers, unpack it into its official layout and check
    the layout and clip count with the dataset's adapter."""
    from audiofx.pipeline.download import download, listing

    if list_only:
        plan = listing(dataset, root, mirror)
        source = plan.source
        click.echo(f"{dataset}: {len(source.archives)} file(s) from {source.page}; {source.clips} clips once complete")
        for a, url in zip(source.archives, plan.urls):
            click.echo(f"  {a.name}  {url}  md5 {a.md5 or '-'}")
        click.echo(f"  unpack {source.folder + '/ as' if source.folder else 'into'} {plan.root}")
        if source.note:
            click.echo(f"  note: {source.note}")
        return
    s = download(dataset, root, mirror=mirror, progress=not no_progress, keep_archives=keep_archives, say=click.echo)
    if s.status == "present":
        click.echo(f"{dataset} is already complete in {s.root} ({s.clips} clips); nothing to do")
        return
    resumed = f", resumed {', '.join(s.resumed)}" if s.resumed else ""
    click.echo(_downloaded(s))
    click.echo(f"  fetched {_size(s.fetched_bytes)}{resumed}; archives {'kept in' if s.kept_archives else 'removed from'} "
               f"{s.archives}")


def _downloaded(s) -> str:
    """The line download and extract --download print for a dataset they fetched."""
    return f"downloaded {s.dataset} -> {s.root}: {s.clips} clips, layout checked"


CACHE_EXAMPLE = """
\b
Examples:
  audiofx cache ls --store s3://lab-audio/features
  audiofx cache push 3fa2 --to s3://lab-audio/features
  audiofx cache pull 3fa2 --from s3://lab-audio/features --fold 1
  audiofx cache verify --store s3://lab-audio/features
  audiofx cache gc --yes
"""


@cli.group(epilog=CACHE_EXAMPLE)
def cache():
    """Inspect, check, share and clean feature stores (local or remote).

    KEY is a feature key prefix or DATASET/KEY, as `audiofx cache ls` shows them."""


@cache.command("ls")
@store_option
def cache_ls(store):
    """Datasets, keys, folds, clip counts, sizes and creation times in a store."""
    from audiofx.pipeline.store import FeatureStore

    fs = FeatureStore(store)
    rows = []
    for ds, key, _ in fs.groups():
        try:
            m = fs.read_manifest(ds, key)
        except StoreError:
            rows.append((ds, key, "-", "-", _size(fs.group_bytes(ds, key)), "-", "incomplete"))
            continue
        partial = m.get("partial_folds")
        status = "complete" if partial is None else f"partial (folds {','.join(partial)})"
        rows.append((ds, key, str(len(m["folds"])), str(m["clips"]), _size(m["sizes"]["stored_bytes"]), m["created_at"],
                     status))
    if not rows:
        click.echo(f"no feature sets in {fs} (make one with: audiofx extract --dataset demo)")
        return
    header = ("dataset", "key", "folds", "clips", "size", "created", "status")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


@cache.command("info")
@click.argument("key")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest.")
def cache_info(key, store, as_json):
    """Everything about one feature set."""
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
        absent = m.get("partial_folds") is not None and fold not in m["partial_folds"]
        click.echo(f"  fold {fold}: {f['ok']} clips" + (f" ({f['skipped']} skipped)" if f["skipped"] else "")
                   + (" (not pulled here)" if absent else ""))
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
@store_option
def cache_verify(key, store):
    """Recompute every checksum and name each damaged chunk or array."""
    from audiofx.pipeline.store import FeatureStore

    fs = FeatureStore(store)
    targets = [fs.find(key)] if key else [(d, k) for d, k, _ in fs.groups()]
    if not targets:
        raise StoreError(f"no feature sets in {fs}", "check --store")
    damaged = 0
    for ds, k in targets:
        if not fs.has_manifest(ds, k):  # an extraction in progress, or interrupted: not damage
            done = len(fs.unit_records(ds, k))
            click.echo(f"incomplete {ds}/{k}: no manifest yet, {done} write unit(s) done (an extraction is running "
                       "or was interrupted: rerunning the same extract command finishes it)")
            continue
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


def _copy(key: str, src_url: str, dst_url: str, folds: tuple[str, ...], progress: bool, verb: str) -> None:
    from audiofx.pipeline.store import FeatureStore
    from audiofx.pipeline.transfer import copy_group

    src, dst = FeatureStore(src_url), FeatureStore(dst_url)
    ds, full = src.find(key)
    r = copy_group(src, dst, ds, full, folds=list(folds) or None, progress=progress)
    if r.up_to_date:
        click.echo(f"{ds}/{full} is already in {dst}; nothing to {verb}")
        return
    resumed = f", {r.objects_skipped} already there" if r.objects_skipped else ""
    click.echo(f"{verb}ed {ds}/{full} ({'folds ' + ','.join(r.folds)}) {src} -> {dst}: "
               f"{r.objects_copied} objects, {_size(r.bytes_copied)}{resumed}; checksums verified")


@cache.command("push")
@click.argument("key")
@click.option("--to", "to_url", required=True, help="Destination store (URL or directory).")
@click.option("--store", default="data/features", show_default=True, help="The local store to push from.")
@click.option("--no-progress", is_flag=True)
def cache_push(key, to_url, store, no_progress):
    """Copy a complete feature set to a shared store. Resumes after an interruption; the
    destination's manifest is written last, after every value is checked."""
    _copy(key, store, to_url, (), not no_progress, "push")


@cache.command("pull")
@click.argument("key")
@click.option("--from", "from_url", required=True, help="Source store (URL or directory).")
@click.option("--store", default="data/features", show_default=True, help="The local store to pull into.")
@click.option("--fold", "folds", multiple=True, help="Only this fold (repeatable) [all].")
@click.option("--no-progress", is_flag=True)
def cache_pull(key, from_url, store, folds, no_progress):
    """Copy a feature set (or some folds of it) from a shared store. Resumes after an
    interruption; the local manifest is written last, after every value is checked."""
    _copy(key, from_url, store, folds, not no_progress, "pull")


@cache.command("rm")
@click.argument("keys", nargs=-1, required=True)
@store_option
@click.option("--yes", is_flag=True, help="Remove without asking.")
def cache_rm(keys, store, yes):
    """Remove feature sets from a store."""
    from audiofx.pipeline.store import FeatureStore

    fs = FeatureStore(store)
    targets = [fs.find(k) for k in keys]
    for ds, k in targets:
        click.echo(f"remove {ds}/{k} ({_size(fs.group_bytes(ds, k))}) from {fs}")
    if not _confirmed(yes, f"remove {len(targets)} feature set(s)?"):
        return
    for ds, k in targets:
        fs.remove(ds, k)
    click.echo(f"removed {len(targets)} feature set(s)")


@cache.command("gc")
@store_option
@click.option("--runs", "runs_root", default="data/runs", show_default=True, help="Runs whose feature sets are kept.")
@click.option("--min-age", default=24.0, show_default=True, type=click.FloatRange(min=0),
              help="Hours an incomplete set must be untouched before it counts as abandoned.")
@click.option("--yes", is_flag=True, help="Remove without asking.")
@read_cache_options
def cache_gc(store, runs_root, min_age, yes):
    """Remove what is no longer useful: incomplete sets untouched for --min-age hours (an
    extraction in progress is left alone), sets of an older feature code version that no
    run in --runs uses, and, in the read-through cache, the least recently used sets over
    its size limit."""
    from audiofx.pipeline.garbage import collect_garbage

    plan = collect_garbage(store, runs_root, min_age_hours=min_age)
    if not plan.items:
        click.echo(f"nothing to remove in {plan.store}")
    for item in plan.items:
        click.echo(f"remove {item.dataset}/{item.key} ({_size(item.bytes)}): {item.reason}")
    if plan.items and _confirmed(yes, f"remove {len(plan.items)} feature set(s)?"):
        plan.remove()
        click.echo(f"removed {len(plan.items)} feature set(s), {_size(sum(i.bytes for i in plan.items))}")
    evicted = plan.evict_cache()
    if evicted:
        click.echo(f"read-through cache: removed {len(evicted)} least recently used set(s) over its limit")


def _confirmed(yes: bool, question: str) -> bool:
    """--yes, or a yes at an interactive prompt; without a terminal nothing is removed."""
    if yes:
        return True
    if sys.stdin.isatty():
        return click.confirm(question, default=False)
    click.echo("nothing removed: pass --yes to remove")
    return False


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


class KList(click.ParamType):
    """--k 200 or --k 5,35,200: one number of neighbours (an int, as runs have recorded it) or
    several (a tuple), each 1 or more, none twice."""

    name = "k"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, tuple)):
            return value
        try:
            ks = tuple(int(part) for part in str(value).split(","))
        except ValueError:
            ks = ()
        if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
            self.fail(f"{value!r} is not one or more distinct whole numbers of neighbours, 1 or more (e.g. 5,35,200)",
                      param, ctx)
        return ks[0] if len(ks) == 1 else ks


class MethodsCommand(click.Command):
    """A command whose help names the registered SSL methods (``{methods}`` and
    ``{temperatures}`` in an option's help) and, with ``method_options``, that takes each
    method's own options (--nce-k, --bn-splits, ...) after its ``freq_masks`` option, as the
    methods declare them (audiofx/training/models/ssl/). Both are filled in when the command
    parses or shows its help, not at every start of audiofx: the methods import torch."""

    def __init__(self, *args, method_options: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._with_options, self._filled = method_options, False

    def get_params(self, ctx):
        if not self._filled:
            import inspect

            from audiofx.training.models.ssl import METHODS, method_options

            temperatures = ", ".join(f"{m.title} {inspect.signature(m).parameters['temperature'].default}"
                                     for m in METHODS.values())
            for param in self.params:
                if getattr(param, "help", None):
                    param.help = param.help.replace("{methods}", ", ".join(METHODS)).replace(
                        "{temperatures}", temperatures)
            if self._with_options:
                at = next(i for i, p in enumerate(self.params) if p.name == "freq_masks") + 1
                self.params[at:at] = [_method_option(method, option) for method, option in method_options()]
            self._filled = True
        return super().get_params(ctx)


def _method_option(method, option) -> click.Option:
    kind = option.type
    if option.minimum is not None or option.maximum is not None:
        kind = (click.IntRange if option.type is int else click.FloatRange)(min=option.minimum, max=option.maximum)
    return click.Option([option.flag, option.name], type=kind, default=option.default,
                        show_default=option.default is not None, help=f"{method.title}: {option.help}.")


@cli.command(cls=MethodsCommand, method_options=True, epilog=TRAIN_EXAMPLE)
@click.option("--method", required=True, help="The self-supervised method: {methods}.")
@click.option("--datasets", default="", help="Comma-separated datasets for the unlabeled pool [every dataset in the store of the preset's size].")
@store_option
@read_cache_options
@click.option("--preset", default="shin2021", show_default=True, help="Which extracted features to use.")
@click.option("--set", "set_options", multiple=True, metavar="[DATASET:]KEY=VALUE",
              help="Which stored set of each pooled dataset: the --set extract was given (folds=2 for every dataset "
                   "with that option, dcase2013:folds=2 for one; feature options for all) [the preset at each "
                   "dataset's default options].")
@click.option("--hold-out-fold", default=None, metavar="FOLD",
              help="Leave this fold of every pooled dataset out of pretraining (the fold a per-dataset protocol tests "
                   "on: Hornauer et al.'s phase 1).")
@click.option("--arch", default=None, help="resnet18/34/50, esresnet50 (ESResNet with attention), densenet201, vgg16, alexnet, tiny [the --init weights', else resnet50].")
@click.option("--init", default="scratch", show_default=True, help="Where the encoder starts: " + INIT_HELP)
@weights_options
@click.option("--epochs", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=None, help="SGD learning rate [the method's default].")
@click.option("--temperature", type=float, default=None, help="[the method's: {temperatures}]")
@click.option("--time-crop", type=click.IntRange(min=1), default=None,
              help="Each view a random crop of N frames [the whole clip].")
@click.option("--time-shift", type=click.IntRange(min=0), default=None,
              help="Random circular time shift of up to N frames; 0 is off [a quarter of the view's frames].")
@click.option("--freq-shift", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random shift of up to N frequency bins (edge bins repeated): a pitch-like change of each view.")
@click.option("--resized-crop", type=click.FloatRange(min=0, max=1), default=0.0, show_default=True,
              help="Each view a random region of at least this share of the bins and, apart, of the frames, "
                   "resized back (a time stretch and a pitch-like shift in one); 0 is off.")
@click.option("--gain-db", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Each view at a random level, up to this many dB louder or quieter; 0 is off.")
@click.option("--eq-db", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Each view through a random smooth equaliser (7 bands over the bins, up to this many dB "
                   "either way each): another microphone or room; 0 is off.")
@click.option("--spec-augment/--no-spec-augment", default=True, show_default=True,
              help="SpecAugment time and frequency masks (up to a tenth of the view's frames, an eighth of the bins).")
@click.option("--time-masks", type=click.IntRange(min=0), default=2, show_default=True, help="Time masks per view.")
@click.option("--freq-masks", type=click.IntRange(min=0), default=2, show_default=True, help="Frequency masks per view.")
@run_options(resume_help="Continue an interrupted run (give its --name).")
def pretrain(method, datasets, store, preset, set_options, hold_out_fold, arch, init, weights, init_branch, epochs, batch_size, lr, temperature, time_crop, time_shift,
             freq_shift, resized_crop, gain_db, eq_db, spec_augment, time_masks, freq_masks, seed, device, runs_root, name, resume, memory_budget, no_progress,
             **options):
    """Learn a representation without labels from the cached features (NPID, SimCLR, MoCo v2)."""
    from audiofx.training.stages.pretrain import PretrainConfig
    from audiofx.training.stages.pretrain import pretrain as run_pretrain

    result = run_pretrain(PretrainConfig(
        method=method, datasets=tuple(d for d in datasets.split(",") if d), store=store, preset=preset,
        set_options=parse_overrides(set_options), hold_out_fold=hold_out_fold, arch=arch,
        init=init, weights=weights, init_branch=init_branch, epochs=epochs, batch_size=batch_size, lr=lr, temperature=temperature, time_crop=time_crop,
        time_shift=time_shift, freq_shift=freq_shift, resized_crop=resized_crop, gain_db=gain_db, eq_db=eq_db, spec_augment=spec_augment, time_masks=time_masks, freq_masks=freq_masks,
        options=options, seed=seed, device=device, runs_root=runs_root, name=name, resume=resume,
        progress=not no_progress, memory_budget_gb=memory_budget),
        say=click.echo)
    if _main_rank():
        click.echo(f"pretrained {method}: {result['run']} (final loss {result['loss']:.4f})")


FINETUNE_EXAMPLE = """
\b
Examples:
  audiofx finetune --dataset esc50 --init imagenet --fold all
  audiofx finetune --dataset gtzan --init simclr --epochs 70 --batch-size 32 --lr 1e-4
  audiofx finetune --dataset urbansound8k --init npid:npid-resnet50-20261121-101500 --fold 3
  audiofx finetune --dataset tut2018 --preset zhou2019 --arch vgg16 --init imagenet --fragments 6 --channel-fusion --head mlp-attn
"""


@cli.command(cls=MethodsCommand, epilog=FINETUNE_EXAMPLE)
@click.option("--dataset", required=True)
@click.option("--init", default="scratch", show_default=True, help=INIT_HELP)
@weights_options
@store_option
@read_cache_options
@click.option("--preset", default="shin2021", show_default=True)
@click.option("--key", default=None, help="A feature key (prefix), when several feature sets match.")
@set_option
@click.option("--arch", default=None,
              help="resnet18/34/50, esresnet50 (ESResNet with attention), densenet201, vgg16, alexnet (fully "
                   "convolutional + GAP), tiny "
                   "[resnet50, or the pretrain run's arch].")
@click.option("--fold", default="all", show_default=True, help="all, or one test fold.")
@click.option("--epochs", type=click.IntRange(min=1), default=70, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--weight-decay", type=float, default=1e-3, show_default=True)
@click.option("--spec-augment", is_flag=True, help="SpecAugment time and frequency masks.")
@click.option("--time-masks", type=click.IntRange(min=0), default=2, show_default=True,
              help="With --spec-augment: time masks per clip (0: frequency masks only).")
@click.option("--freq-masks", type=click.IntRange(min=0), default=2, show_default=True,
              help="With --spec-augment: frequency masks per clip (0: time masks only).")
@click.option("--time-crop", type=click.IntRange(min=1), default=None,
              help="Train on a random crop of N frames of each clip (test clips stay whole).")
@click.option("--time-shift", type=click.IntRange(min=0), default=0, help="Random circular time shift of up to N frames.")
@click.option("--mixup", type=float, default=0.0, help="Mixup with Beta(a, a); 0 is off.")
@click.option("--fragments", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cut each clip into N time fragments (trained as samples; posteriors averaged per clip).")
@click.option("--channel-fusion", is_flag=True,
              help="Each channel (zhou2019: left, right, mid) its own sample; posteriors averaged per clip.")
@click.option("--head", type=click.Choice(["linear", "mlp-attn"]), default="linear", show_default=True,
              help="linear: global average pool + linear; mlp-attn: Zhou et al.'s MLP attention.")
@input_channel_option
@click.option("--val-split", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True,
              help="A stratified seeded share of each test fold's training folds held out (not trained on) to select "
                   "epochs on, per fold and on the fold-averaged curve; sets with a validation split of their own "
                   "(FSD50K, ratios=70/15/15) use theirs.")
@run_options(resume_help="Continue an interrupted run (give its --name); a larger --epochs extends it.")
def finetune(dataset, init, weights, init_branch, store, preset, key, set_options, arch, fold, epochs, batch_size, lr, weight_decay, spec_augment,
             time_masks, freq_masks, time_crop, time_shift, mixup, fragments, channel_fusion, head, input_channel,
             val_split, memory_budget, seed, device, runs_root, name, resume, no_progress):
    """Fine-tune a classifier with k-fold cross-validation on the official folds."""
    from audiofx.training.models.augment import Augment
    from audiofx.training.stages.finetune import FinetuneConfig
    from audiofx.training.stages.finetune import finetune as run_finetune
    from audiofx.training.stages.tasks import METRIC_NAMES

    s = run_finetune(FinetuneConfig(
        dataset=dataset, init=init, weights=weights, init_branch=init_branch, store=store, preset=preset, key=key,
        set_options=parse_overrides(set_options), arch=arch, fold=fold,
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        augment=Augment(spec_augment=spec_augment, time_masks=time_masks, freq_masks=freq_masks, time_crop=time_crop,
                        time_shift=time_shift, mixup=mixup), fragments=fragments,
        channel_fusion=channel_fusion, head=head, input_channel=input_channel, val_split=val_split,
        memory_budget_gb=memory_budget,
        seed=seed, device=device,
        runs_root=runs_root, name=name, resume=resume, progress=not no_progress), say=click.echo)
    if not _main_rank():
        return
    m = s["metric"]
    selected = (f", {100 * s[f'selected_{m}_mean']:.2f} ± {100 * s[f'selected_{m}_std']:.2f}% at the epoch the "
                "validation split selects" if f"selected_{m}_mean" in s else "")
    selected += (f" ({100 * s[f'curve_selected_{m}_mean']:.2f} ± {100 * s[f'curve_selected_{m}_std']:.2f}% at epoch "
                 f"{s['curve_selected_epoch']}, best on the fold-averaged validation curve)"
                 if f"curve_selected_{m}_mean" in s else "")
    click.echo(f"{METRIC_NAMES[m]} over {s['n_folds']} fold(s): last epoch {100 * s[f'last_{m}_mean']:.2f} ± "
               f"{100 * s[f'last_{m}_std']:.2f}%, best epoch {100 * s[f'best_{m}_mean']:.2f} ± "
               f"{100 * s[f'best_{m}_std']:.2f}% (selected on the test fold){selected}; {s['run']}/summary.md")


@cli.command("evaluate", cls=MethodsCommand)
@click.option("--run", "run_spec", required=True,
              help="The representation: random (the same network at random init, give --arch: the baseline), logmel "
                   "(no network: the log-mel inputs themselves, each channel pooled to 32 x 25: the other reference), or "
                   + INIT_HELP.removeprefix("scratch; "))
@weights_options
@click.option("--arch", default=None,
              help="For --run random: the network [resnet50; checkpoints record theirs or tell it by their shapes].")
@click.option("--dataset", default=None,
              help="The labelled set to score on [a pretrain run pooled on one dataset: that one].")
@click.option("--mode", default="knn", show_default=True, help="knn or linear.")
@click.option("--fold", default="all", show_default=True)
@store_option
@read_cache_options
@click.option("--preset", default="shin2021", show_default=True)
@click.option("--key", default=None, help="A feature key (prefix), when several feature sets match.")
@set_option
@click.option("--k", "k", type=KList(), default="200", show_default=True, metavar="K[,K...]",
              help="kNN neighbours; a list reports each, the first as the headline (k chosen by cross-validation on "
                   "the training folds is reported too).")
@click.option("--space", type=click.Choice(["backbone", "projection"]), default=None,
              help="Embeddings scored: backbone (pooled encoder features) or projection (the pretrain method's own "
                   "space) [kNN of a pretrain run: projection, as NPID, Hornauer et al. and Lin vote; else backbone].")
@click.option("--bn-stats", type=click.Choice(["carried", "clips"]), default="carried", show_default=True,
              help="BatchNorm statistics: the encoder's own (a network at random init: mean 0, variance 1, so no "
                   "normalisation; a pretrained one: its views') or recomputed on the evaluated clips (no labels).")
@click.option("--probe", type=click.Choice(["lbfgs", "sgd"]), default="lbfgs", show_default=True,
              help="Linear probe: lbfgs (logistic regression on standardised embeddings, solved to convergence, its "
                   "penalty cross-validated on the training folds) or sgd (the papers' recipe: Adam epochs, logged "
                   "per epoch).")
@click.option("--epochs", "linear_epochs", type=click.IntRange(min=1), default=100, show_default=True,
              help="--probe sgd: epochs.")
@click.option("--lr", "linear_lr", type=float, default=1e-3, show_default=True, help="--probe sgd: Adam's learning rate.")
@click.option("--weight-decay", "linear_weight_decay", type=float, default=None,
              help="The probe's L2 penalty lambda [lbfgs: chosen by cross-validation on the training folds; sgd: 1e-6].")
@input_channel_option
@run_options()
def evaluate_cmd(run_spec, weights, init_branch, arch, dataset, mode, fold, store, preset, key, set_options, k, space,
                 bn_stats, probe, linear_epochs, linear_lr, linear_weight_decay, input_channel, memory_budget, seed,
                 device, runs_root, name):
    """Frozen-encoder evaluation: linear probe or weighted kNN, per fold."""
    from audiofx.training.stages.evaluate import EvaluateConfig, evaluate
    from audiofx.training.stages.tasks import METRIC_NAMES

    s = evaluate(EvaluateConfig(run=run_spec, arch=arch, weights=weights, init_branch=init_branch, dataset=dataset,
                                mode=mode, fold=fold, store=store, preset=preset, key=key,
                                set_options=parse_overrides(set_options), k=k, space=space, bn_stats=bn_stats,
                                probe=probe, linear_epochs=linear_epochs, linear_lr=linear_lr,
                                linear_weight_decay=linear_weight_decay, input_channel=input_channel,
                                memory_budget_gb=memory_budget, seed=seed,
                                device=device, runs_root=runs_root, name=name),
                 say=click.echo)
    m = s["metric"]
    by_cv = (f" ({100 * s[f'{m}_kcv_mean']:.2f} ± {100 * s[f'{m}_kcv_std']:.2f}% with k chosen on the training folds)"
             if f"{m}_kcv_mean" in s else "")
    click.echo(f"{mode} {METRIC_NAMES[m]} over {s['n_folds']} fold(s): {100 * s[f'{m}_mean']:.2f} ± "
               f"{100 * s[f'{m}_std']:.2f}%{by_cv}; {s['run']}/summary.md")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
def compare(runs):
    """A table of finetune and evaluate runs: mean ± std accuracy over folds."""
    from audiofx.training.report.compare import compare_table

    click.echo(compare_table(list(runs)))


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for report.md and its figures [data/reports/<time>].")
@click.option("--store", default=None, help="Feature store for the t-SNE [the one each run recorded].")
@read_cache_options
@click.option("--no-tsne", is_flag=True, help="Leave out the t-SNE figures (they need the store and checkpoints).")
def report(runs, out, store, no_tsne):
    """A markdown report with figures from finetune, evaluate and pretrain runs: accuracy
    table, accuracy and loss curves, confusion matrices, per-class scores, t-SNE."""
    import time

    from audiofx.training.report.build import build_report

    out = out or Path("data/reports") / time.strftime("%Y%m%d-%H%M%S")
    path = build_report(list(runs), out, store=store, tsne=not no_tsne, say=click.echo)
    figures = sorted((path.parent / "figures").glob("*.png"))
    click.echo(f"report with {len(figures)} figure(s): {path}")


REPRODUCE_EXAMPLE = """
\b
Examples:
  audiofx reproduce shin2021 --dry-run
  audiofx reproduce shin2021 --root esc50=/data/ESC-50-master --root gtzan=/data/gtzan --weights resnet50.pth \\
      --simclr-weights resnet50-1x.pth
  audiofx reproduce lin2022 --datasets esc50 --arch tiny --epochs-scale 0.02   # a smoke run
"""


@cli.command(epilog=REPRODUCE_EXAMPLE)
@click.argument("recipe", type=click.Choice(list(RECIPES)))
@click.option("--dry-run", is_flag=True, help="Print the audiofx commands and the number of training runs; run nothing.")
@click.option("--epochs-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Multiply every epoch budget (rounded, at least 1): e.g. 0.02 for a smoke run.")
@store_option
@click.option("--runs", "runs_root", default="data/runs", show_default=True)
@click.option("--arch", default=None, help="Override the recipe's backbone (e.g. tiny for a smoke run).")
@click.option("--device", default=None, help="auto, cpu or cuda, for every stage [each stage's default].")
@click.option("--weights", multiple=True, metavar="[ARCH=]FILE",
              help="torchvision's ImageNet checkpoint for the ImageNet rows (offline): FILE for the recipe's "
                   "backbone, ARCH=FILE for another (zhou2019: alexnet=, resnet50=); repeatable [the torch hub cache].")
@click.option("--simclr-weights", default=None,
              help="SimCLR's ImageNet ResNet-50 (resnet50-1x.pth, docs/checkpoints.md) for shin2021's SimCLR rows "
                   "[the torch hub cache].")
@click.option("--root", "roots", multiple=True, metavar="DATASET=PATH", help="A dataset root for extract (repeatable).")
@click.option("--datasets", default="", help="Only these of the recipe's datasets (comma-separated).")
@click.option("--no-progress", is_flag=True)
def reproduce(recipe, dry_run, epochs_scale, store, runs_root, arch, device, weights, simclr_weights, roots, datasets,
              no_progress):
    """Run a paper's stages (extract, pretrain, finetune, evaluate) with its settings and end
    with its table next to the paper's numbers. Finished runs are skipped, unfinished ones
    resumed."""
    from audiofx.reproduce import ReproduceOptions, parse_roots, parse_weights
    from audiofx.reproduce import reproduce as run_reproduce

    result = run_reproduce(ReproduceOptions(
        recipe=recipe, dry_run=dry_run, epochs_scale=epochs_scale, store=store, runs=runs_root, arch=arch,
        device=device, **parse_weights(weights), simclr_weights=simclr_weights, roots=parse_roots(roots),
        datasets=tuple(d for d in datasets.split(",") if d),
        progress=not no_progress), cli, say=click.echo)
    if dry_run:
        return
    click.echo("")
    click.echo(result["table"])
    click.echo(f"table: {result['table_path']}")
    if result["report"]:
        click.echo(f"report: {result['report']}")


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
