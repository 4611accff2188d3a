"""Does self-supervised pretraining beat random init on real sound? NPID, SimCLR and MoCo on
the real recordings of ../shared/realdev, against the same network at random init.

    python benchmarks/ssl_check.py [--set speech|mridangam] [--methods npid,simclr,moco] [--seeds 3]
                                   [--epochs 30] [--finetune-epochs 10] [--arch tiny] [--work DIR]
                                   [--augment-copies 4 --augment-pitch 3 --augment-shift 0.2
                                    --augment-flip 0] [--resized-crop 0] [--freq-masks 2]
                                   [--gain-db 0] [--eq-db 0] [--pool-with speech|mridangam]
                                   [--bn-stats carried|clips]

The set's clips are extracted once (5 folds grouped by speaker, or by the drum's tonic, so
one voice or tuning is never on both sides), and once more with --augment-copies augmented
copies of each clip's waveform (pitch shift, offset; the views draw from them); then for
each seed (the inputs' row once: it has no seed):
  log-mel inputs  no network, the standardised log-mels pooled to a grid (evaluate --run
               logmel): the same kNN and probe, the reference both networks are read against;
  random init  the network at random init (seeded): kNN (k 200 and k chosen on the training
               folds) and the linear probe (logistic regression, penalty chosen on the
               training folds), all on the backbone's pooled features;
  METHOD       pretrained on every clip without labels for --epochs, then the same kNN and
               probe (kNN also in the method's own projection space, evaluate's default), and
               fine-tuned on every fold for --finetune-epochs against scratch at equal epochs.
With --pool-with, each method pretrains on a larger pool: the set's clips and those of the sets
named, unlabelled (a store of their own, with the same copies), as the papers pretrain on one
set and evaluate on another; evaluation and fine-tuning stay on --set's clips and folds.
Printed: mean ± std over seeds of each figure, and each method's margin over random init in
units of the larger standard deviation (target: over 2 for kNN and probe); then kNN (k by CV)
and the probe per test fold, with the speakers or tunings each holds, where they move, and the
penalty each seed's probe chose there (ssl-check.json also keeps what every penalty scored on
the training folds).

Run again with the same --work, it reuses the store and every finished pretrain and fine-tune
run of the same name (resumed: other settings are refused), and evaluates afresh (evaluate
runs are named by the invocation's time): so `--bn-stats clips` over earlier pretraining costs
only the evaluations.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

REALDEV = REPO.parent / "shared" / "realdev"
SETS = {  # folder, label column, group column, the group name in the printout
    "speech": ("speech_commands_v002_test", "label", "speaker_id", "speaker"),
    "mridangam": ("mridangam_stroke", "label", "tonic", "tonic"),
}
FOLDS = 5
FEATURES = {"sample_rate": 16000, "clip_seconds": 1.0, "frames": 100}


def grouped_split(root: Path, label: str, group: str, out: Path) -> tuple[Path, dict[str, list[str]]]:
    """path,label,fold with whole groups per fold, the largest groups first to the smallest fold;
    also each fold's groups (fold name -> group names)."""
    rows = list(csv.DictReader(open(root / "labels.csv")))
    sizes: dict[str, int] = defaultdict(int)
    for r in rows:
        sizes[r[group]] += 1
    fold_of, load = {}, [0] * FOLDS
    for g in sorted(sizes, key=lambda g: (-sizes[g], g)):
        f = min(range(FOLDS), key=lambda i: (load[i], i))
        fold_of[g], load[f] = f + 1, load[f] + sizes[g]
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "fold"])
        for r in rows:
            w.writerow([r["path"], r[label], fold_of[r[group]]])
    groups_of: dict[str, list[str]] = defaultdict(list)
    for g in sorted(fold_of):
        groups_of[str(fold_of[g])].append(g)
    return out, dict(groups_of)


def pooled_split(sets: list[str], root: Path) -> Path:
    """A folder dataset at root of every named set's clips (a link to each set's folder), the
    labels prefixed by the set (pretraining reads none) and each set's own grouped folds."""
    root.mkdir(parents=True, exist_ok=True)
    out = root.parent / "pool-split.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "fold"])
        for name in sets:
            folder, label, group, _ = SETS[name]
            link = root / folder
            if not link.is_symlink():
                link.symlink_to(REALDEV / folder, target_is_directory=True)
            split, _ = grouped_split(REALDEV / folder, label, group, root.parent / f"pool-{name}-split.csv")
            for r in csv.DictReader(open(split)):
                w.writerow([f"{folder}/{r['path']}", f"{name}:{r['label']}", r["fold"]])
    return out


def at_least(floor: int):
    """An argparse type: an int of at least floor (a negative mask count would run as 0)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < floor:
            raise argparse.ArgumentTypeError(f"must be at least {floor}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", choices=list(SETS), default="speech")
    p.add_argument("--methods", default="npid,simclr,moco")
    p.add_argument("--seeds", type=at_least(1), default=3)
    p.add_argument("--epochs", type=at_least(1), default=30, help="pretraining epochs")
    p.add_argument("--batch-size", type=at_least(1), default=64, help="pretraining batch size")
    p.add_argument("--finetune-epochs", type=at_least(0), default=10, help="0: no fine-tuning comparison")
    p.add_argument("--arch", default="tiny")
    p.add_argument("--augment-copies", type=at_least(0), default=4, help="stored augmented copies per clip (0: none)")
    p.add_argument("--augment-pitch", type=float, default=3.0, help="the copies' pitch shift, semitones either way")
    p.add_argument("--augment-shift", type=float, default=0.2, help="the copies' offset, a share of the clip")
    p.add_argument("--augment-flip", type=float, default=0.0, help="the copies' chance of a time reversal")
    p.add_argument("--resized-crop", type=float, default=0.0, help="views: resized crops of at least this share")
    p.add_argument("--gain-db", type=float, default=0.0, help="views: a random level, up to this many dB either way")
    p.add_argument("--eq-db", type=float, default=0.0, help="views: a random equaliser, up to this many dB a band")
    p.add_argument("--freq-masks", type=at_least(0), help="views: SpecAugment frequency masks [pretrain's default]")
    p.add_argument("--pool-with", default="", help="other realdev sets, comma-separated, whose clips join the "
                   "pretraining pool (no labels); evaluation stays on --set")
    p.add_argument("--bn-stats", choices=("carried", "clips"), default="carried",
                   help="every network's BatchNorm statistics in the frozen evaluations (evaluate --bn-stats)")
    p.add_argument("--work", type=Path, help="working folder (default: a temp dir); its store and runs are reused")
    return p


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    pool_with = [s for s in args.pool_with.split(",") if s]
    for other in pool_with:
        if other not in SETS or other == args.set:
            cli.error(f"--pool-with {other!r}: name sets other than --set {args.set}, of {', '.join(SETS)}")
    folder, label, group, group_name = SETS[args.set]
    root = REALDEV / folder
    if not (root / "labels.csv").is_file():
        print(f"skipped: the real recordings are not at {root} (../shared/realdev, see its README)", file=sys.stderr)
        return 0

    from audiofx.pipeline.extract import ExtractRequest, extract
    from audiofx.training.models.encoders import LogmelGrid
    from audiofx.training.stages.evaluate import EvaluateConfig, evaluate
    from audiofx.training.stages.finetune import FinetuneConfig, finetune
    from audiofx.training.stages.pretrain import PretrainConfig, pretrain
    from audiofx.training.stages.weights import LOGMEL, RANDOM

    freq_masks = PretrainConfig.freq_masks if args.freq_masks is None else args.freq_masks

    quiet = {"say": lambda *a, **k: None}
    work = args.work or Path(tempfile.mkdtemp(prefix="audiofx-ssl-check-"))
    work.mkdir(parents=True, exist_ok=True)
    store = str(work / "features")
    split, fold_groups = grouped_split(root, label, group, work / f"{args.set}-split.csv")
    started = time.perf_counter()
    summary = extract(ExtractRequest(dataset="folder", root=root, store=store, progress=False,
                                     overrides={**FEATURES, "split": str(split)}), on_event=lambda m: None)
    dataset = summary.dataset
    augment = {"augment_copies": args.augment_copies, "augment_pitch": args.augment_pitch,
               "augment_shift": args.augment_shift, "augment_flip": args.augment_flip}
    if args.augment_copies:
        extract(ExtractRequest(dataset="folder", root=root, store=store, progress=False,
                               overrides={**FEATURES, "split": str(split), **augment}), on_event=lambda m: None)
    print(f"extracted the {args.set} clips into {store} ({time.perf_counter() - started:.0f} s), 5 folds grouped "
          f"by {group_name}" + (f", and {args.augment_copies} augmented copies of each" if args.augment_copies else ""),
          file=sys.stderr)
    pool_store = store
    if pool_with:
        started = time.perf_counter()
        pool_store = str(work / "pool-features")
        pool_split = pooled_split([args.set, *pool_with], work / "pool")
        for extra in ({}, augment) if args.augment_copies else ({},):
            extract(ExtractRequest(dataset="folder", root=work / "pool", store=pool_store, progress=False,
                                   overrides={**FEATURES, "split": str(pool_split), **extra}), on_event=lambda m: None)
        print(f"extracted the pretraining pool ({args.set} + {' + '.join(pool_with)}) into {pool_store} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    runs = str(work / "runs")
    stamp = time.strftime("%Y%m%d-%H%M%S")  # evaluate runs of this invocation

    def reused(stage: str, name: str) -> bool:
        return (Path(runs) / stage / name / "config.json").is_file()

    results: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    # run -> figure -> test fold -> one value per seed: where (which speaker, which tuning) it moves
    by_fold: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))

    def record(row: str, figure: str, s: dict, key: str) -> None:
        results[row][figure].append(s[f"{key}_mean"])
        for fold, r in s["folds"].items():
            by_fold[row][figure][str(fold)].append(r[key])

    def frozen(row: str, run: str, seed: int, name: str, spaces=("backbone",), arch: str | None = args.arch) -> None:
        bn = "carried" if run == LOGMEL else args.bn_stats  # the inputs have no network
        for space in spaces:
            s = evaluate(EvaluateConfig(run=run, arch=arch, dataset=dataset, mode="knn", space=space, store=store,
                                        runs_root=runs, name=f"{stamp}-{name}-knn-{space}", seed=seed, device="cpu",
                                        bn_stats=bn), **quiet)
            record(row, f"kNN k200 ({space})", s, "acc")
            record(row, f"kNN k by CV ({space})", s, "acc_kcv")
        s = evaluate(EvaluateConfig(run=run, arch=arch, dataset=dataset, mode="linear", space="backbone",
                                    store=store, runs_root=runs, name=f"{stamp}-{name}-probe", seed=seed, device="cpu",
                                    bn_stats=bn), **quiet)
        record(row, "probe (backbone)", s, "acc")
        for fold, r in s["folds"].items():  # the penalty each fold chose, and what each scored on its training folds
            by_fold[row]["probe penalty chosen"][str(fold)].append(r["weight_decay"])
            for wd, acc in r.get("cv_weight_decay", {}).items():
                by_fold[row][f"probe on the training folds, penalty {wd:g}"][str(fold)].append(acc)

    def tuned(row: str, init: str, seed: int, name: str) -> None:
        if args.finetune_epochs:
            s = finetune(FinetuneConfig(dataset=dataset, init=init, arch=args.arch, epochs=args.finetune_epochs,
                                        lr=1e-3, store=store, runs_root=runs, name=name, seed=seed, device="cpu",
                                        progress=False, resume=reused("finetune", name)), **quiet)
            results[row]["fine-tune, last epoch"].append(s["last_acc_mean"])

    frozen("log-mel inputs", LOGMEL, 0, LOGMEL, arch=None)  # no network, no seed
    for seed in range(args.seeds):
        t = time.perf_counter()
        frozen("random init", RANDOM, seed, f"random-{seed}")
        tuned("random init", "scratch", seed, f"scratch-{seed}")
        for method in [m for m in args.methods.split(",") if m]:
            name = f"{method}-{seed}"
            pretrain(PretrainConfig(method=method, datasets=(dataset,), arch=args.arch, epochs=args.epochs,
                                    batch_size=args.batch_size, store=pool_store, runs_root=runs, name=name, seed=seed,
                                    device="cpu", progress=False, resized_crop=args.resized_crop,
                                    freq_masks=freq_masks, gain_db=args.gain_db, eq_db=args.eq_db,
                                    set_options={"augment_copies": args.augment_copies} if args.augment_copies else {},
                                    options={"nce_k": 0} if method == "npid" else {},
                                    resume=reused("pretrain", name)), **quiet)
            frozen(method, f"{method}:{name}", seed, name, spaces=("backbone", "projection"))
            tuned(method, f"{method}:{name}", seed, f"{name}-ft")
        print(f"seed {seed} done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        # Written after every seed: a run stopped part-way keeps the seeds it finished.
        (work / "ssl-check.json").write_text(json.dumps({"runs": results, "by test fold": by_fold}, indent=1) + "\n")

    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    views = (f"the clip and {args.augment_copies} stored copies (pitch +-{args.augment_pitch:g} semitones, offset "
             f"{args.augment_shift:g}, flip {args.augment_flip:g})" if args.augment_copies else "the clip's log-mel alone")
    print(f"set: {args.set} ({dataset}), arch {args.arch}, {args.seeds} seed(s), pretraining {args.epochs} epochs "
          f"batch {args.batch_size}, views from {views}, resized crop {args.resized_crop:g}, "
          f"{freq_masks} frequency masks, level +-{args.gain_db:g} dB, equaliser +-{args.eq_db:g} dB, pretraining "
          f"pool {' + '.join([args.set, *pool_with])}, fine-tuning "
          f"{args.finetune_epochs} epochs, BatchNorm statistics {args.bn_stats}; mean ± std over seeds of the 5-fold "
          "means; margin = (method - random init) / the larger std; log-mel inputs: no network, the standardised "
          f"log-mels pooled to {' x '.join(map(str, LogmelGrid.GRID))} per channel")
    columns = sorted({c for r in results.values() for c in r}, key=lambda c: (not c.startswith("kNN"), c))
    print("| run | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    base = results["random init"]
    for row, cells in results.items():
        out = []
        for c in columns:
            v = np.array(cells.get(c, []))
            if not len(v):
                out.append("-")
                continue
            text = f"{100 * v.mean():.1f}" + (f" ± {100 * v.std(ddof=1):.1f}" if len(v) > 1 else "")
            ref = base.get(c) or base.get(c.replace("(projection)", "(backbone)"))
            if row != "random init" and ref and len(v) > 1 and len(ref) > 1:  # one seed has no spread
                r = np.array(ref)
                spread = max(v.std(ddof=1) if len(v) > 1 else 0, r.std(ddof=1) if len(r) > 1 else 0, 1e-9)
                text += f" ({(v.mean() - r.mean()) / spread:+.1f})"
            out.append(text)
        print(f"| {row} | " + " | ".join(out) + " |")
    folds = sorted(fold_groups, key=int)
    print(f"\nper test fold (the {group_name}s it holds), mean over seeds:")
    held = {f: "+".join(g) if len(g) <= 3 else f"{len(g)} {group_name}s" for f, g in fold_groups.items()}
    print("| run | figure | " + " | ".join(f"{f} ({held[f]})" for f in folds) + " |")
    print("|---|---|" + "---|" * len(folds))
    for row, figures in by_fold.items():
        for figure in ("kNN k by CV (backbone)", "probe (backbone)"):
            print(f"| {row} | {figure} | "
                  + " | ".join(f"{100 * np.mean(figures[figure][f]):.1f}" for f in folds) + " |")
        print(f"| {row} | probe penalty chosen, each seed | "
              + " | ".join("/".join(f"{wd:g}" for wd in figures["probe penalty chosen"][f]) for f in folds) + " |")
    return 0


if __name__ == "__main__":
    from audiofx.errors import AudiofxError

    try:
        sys.exit(main())
    except AudiofxError as err:  # a refused resume, a bad option: one line, as the CLI says it
        print(err.one_line(), file=sys.stderr)
        sys.exit(err.exit_code)
