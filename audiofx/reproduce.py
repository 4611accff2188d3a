"""`audiofx reproduce RECIPE`: a paper's whole sequence of stages (extract, pretrain, finetune,
evaluate) as `audiofx ...` commands, run in-process through the real CLI, ending with the
paper's table next to ours.

The plan is built first, from the recipe (audiofx/recipes.py) and the state of the store and
the run folders, without writing anything; --dry-run prints it. The commands are the CLI's
(the click group audiofx/cli.py passes in): each step is parsed by its command before
anything runs, and run by it. Each command's argument list
is printed and executed as is, so the dry run shows exactly what runs. Run names are
deterministic (<recipe>-<dataset>-<setting>, <recipe>-<pool>-<method> for pretraining), so a
second reproduce skips finished runs and resumes unfinished ones with --resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np

from audiofx.config import FeatureConfig, canonical_json, parse_overrides, resolve_feature_config, split_overrides
from audiofx.errors import AudiofxError, ConfigError, StoreError
from audiofx.pipeline.datasets.base import default_root
from audiofx.pipeline.datasets import get_adapter
from audiofx.recipes import DEFAULT_FOLDS, DOWNLOAD_AS, RECIPES, ClassTable, Recipe, Setting
from audiofx.training.data.featuresets import normal_set_options, resolve_featureset, split_folds, unique_clips
from audiofx.training.models.encoders import imagenet_arch
from audiofx.training.models.published import PUBLISHED, published_file
from audiofx.training.report.build import build_report
from audiofx.training.stages.runs import Run, headline

TRAINING = ("pretrain", "finetune", "evaluate")
# Options whose value may differ between a finished run and a rerun without changing its result.
_TRANSIENT = {"device", "name", "resume", "no_progress", "store", "runs_root", "key", "weights"}
# The named inits whose file reproduce takes: its ReproduceOptions field and its flag.
WEIGHTS_OPTIONS = {"imagenet": ("weights", "--weights"), "imagenet-simclr": ("simclr_weights", "--simclr-weights")}


@dataclass
class ReproduceOptions:
    recipe: str
    dry_run: bool = False
    epochs_scale: float = 1.0
    store: str = "data/features"
    runs: str = "data/runs"
    arch: str | None = None  # overrides the recipe's backbone
    device: str | None = None  # passed to every stage (extract only takes cpu / cuda)
    weights: str | None = None  # ImageNet checkpoint for --init imagenet (of the recipe's backbone)
    arch_weights: dict[str, str] = field(default_factory=dict)  # arch -> its ImageNet checkpoint (Zhou's three nets)
    simclr_weights: str | None = None  # SimCLR's ImageNet ResNet-50 for --init imagenet-simclr
    roots: dict[str, str] = field(default_factory=dict)  # dataset -> root for extract
    datasets: tuple[str, ...] = ()  # a subset of the recipe's datasets
    progress: bool = True


@dataclass
class Step:
    kind: str  # extract | pretrain | finetune | evaluate
    args: list[str]  # what follows `audiofx`: printed and executed as is
    status: str  # run | resume | restart | done | have (features there, or no longer needed) | missing
    run_dir: Path | None = None
    dataset: str | None = None
    setting: Setting | None = None
    folds: int | None = None
    pool: tuple[str, ...] = ()  # pretrain: the datasets it reads
    note: str = ""
    arch: str | None = None  # finetune / evaluate: the row's backbone

    @property
    def command(self) -> str:
        return shlex.join(["audiofx", *self.args])


@dataclass
class Plan:
    recipe: Recipe
    arch: str
    datasets: tuple[str, ...]
    settings: tuple[Setting, ...]  # the table's rows (ImageNet rows dropped for archs without weights)
    steps: list[Step]
    notes: list[str]
    problems: list[str]  # what stops a real run (missing data, weights, unknown options)
    out_dir: Path


def scale_epochs(args: tuple[str, ...] | list[str], scale: float) -> list[str]:
    """The value after every --epochs multiplied by scale, rounded half up, at least 1."""
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a == "--epochs":
            out[i + 1] = str(max(1, math.floor(int(out[i + 1]) * scale + 0.5)))
    return out


def parse_roots(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    roots = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--root {item!r} is not DATASET=PATH", "e.g. --root esc50=/data/ESC-50-master")
        roots[name.strip()] = path
    return roots


def parse_weights(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """--weights FILE (the recipe's backbone) and --weights ARCH=FILE (another), as
    ReproduceOptions' ``weights`` and ``arch_weights``."""
    from audiofx.training.models.encoders import imagenet_arch

    plain, by_arch = [], {}
    for item in items:
        arch, sep, path = item.partition("=")
        if sep and imagenet_arch(arch) is not None:  # esresnet50=FILE: the resnet50 checkpoint it starts from
            by_arch[imagenet_arch(arch)] = path
        else:
            plain.append(item)
    if len(plain) > 1:
        raise ConfigError(f"--weights given {len(plain)} files without an arch ({', '.join(plain)})",
                          "give one FILE for the recipe's backbone and ARCH=FILE for others (e.g. alexnet=FILE)")
    return {"weights": plain[0] if plain else None, "arch_weights": by_arch}


def run_name(recipe: Recipe, dataset: str, slug: str) -> str:
    return f"{recipe.name}-{dataset}-{slug}"


def pretrain_name(recipe: Recipe, pool: tuple[str, ...], method: str) -> str:
    return run_name(recipe, "+".join(pool), method)


def _summary(run_dir: Path) -> dict[str, Any] | None:
    return Run(run_dir).summary()


def _run_state(kind: str, run_dir: Path) -> str:
    finished = (run_dir / "checkpoints" / "final.pt").is_file() if kind == "pretrain" else _summary(run_dir) is not None
    if finished:
        return "done"
    if not run_dir.exists():
        return "run"
    # evaluate has no --resume (it is one pass over frozen embeddings): it starts again.
    return "resume" if kind != "evaluate" and (run_dir / "config.json").is_file() else "restart"


# Fields a set may differ in from the recipe's features and still serve it: a shorter clip
# and fewer frames (a smoke run's set, extracted beforehand to save time) change no recipe.
_LENGTH_FIELDS = ("clip_seconds", "frames")


def _features(store: str, dataset: str, preset: str, protocol: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The manifest of the recipe's set of ``dataset`` (its preset and protocol), or None."""
    overrides = parse_overrides(protocol)
    try:
        manifest = resolve_featureset(store, dataset, preset, overrides=overrides)[1]
        features, _ = split_overrides(overrides, get_adapter(dataset).options)
        wanted = resolve_feature_config(get_adapter(dataset).defaults, preset, features)
    except (StoreError, ConfigError):
        return None
    have = FeatureConfig.from_dict(manifest["feature_config"])
    same = all(getattr(have, f.name) == getattr(wanted, f.name) for f in dataclasses.fields(FeatureConfig)
               if f.name not in _LENGTH_FIELDS)
    return manifest if same else None  # another preset's set (the store's only one) never serves the recipe


def _sets(values: tuple[str, ...], dataset: str | None = None) -> list[str]:
    """A protocol's --set values as arguments (prefixed DATASET: for a pretraining pool)."""
    return [a for v in values for a in ("--set", f"{dataset}:{v}" if dataset else v)]


def _fold_count(manifest: dict[str, Any] | None, dataset: str, args: list[str] = ()) -> int | None:
    """Test folds a finetune or evaluate run goes through: one for --fold K, else the set's."""
    if "--fold" in args and args[args.index("--fold") + 1] != "all":
        return 1
    if manifest is None:
        sets = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
        if any(v.startswith("ratios=") for v in sets):
            return 1
        folds = next((int(v.split("=")[1]) for v in sets if v.startswith("folds=")), None)
        return folds or DEFAULT_FOLDS.get(dataset)
    return len(split_folds(list(manifest["folds"]), "all"))


def _command_params(cli: click.Group, kind: str, args: list[str]) -> dict[str, Any]:
    """Parse a stage's arguments with the real click command (raises on unknown options)."""
    try:
        return cli.commands[kind].make_context(kind, list(args)).params
    except click.UsageError as err:
        raise ConfigError(f"`{shlex.join(['audiofx', *args])}` does not parse: {err.format_message()}",
                          "this audiofx lacks an option the recipe needs; update audiofx") from err


def _differences(cli: click.Group, kind: str, args: list[str], run_dir: Path,
                 features: str | None = None) -> list[str]:
    """Options of the planned command that a finished run was not made with (e.g. a smoke run
    with --epochs-scale in the same --runs folder, or a run made before an option the recipe
    now gives existed), and features other than the recipe's set (``features``: its key):
    such a run must not fill the table."""
    config = json.loads((run_dir / "config.json").read_text())
    defaults = _defaults(cli.commands[kind])
    out = []
    for name, value in _command_params(cli, kind, args).items():
        key = {"run_spec": "run"}.get(name, name)
        if name in _TRANSIENT or value is None:
            continue
        if key not in config:  # made before the option existed: it ran at the option's default
            if canonical_json(_as_recorded(name, value)) != canonical_json(_as_recorded(name, defaults.get(name))):
                out.append(f"{key} not recorded (made before the option existed), not {value!r}")
            continue
        value = _as_recorded(name, value)
        if canonical_json(value) != canonical_json(config[key]):
            out.append(f"{key} {config[key]!r}, not {value!r}")
    if features and config.get("key") and config["key"] != features:
        out.append(f"features {config['key']}, not the recipe's {features}")
    return out


def _defaults(command: click.Command) -> dict[str, Any]:
    """Each option's value when it is not given (click marks an absent multiple option's
    default with a sentinel: it is empty)."""
    ctx = click.Context(command)
    out = {}
    for p in command.params:
        value = p.get_default(ctx)
        out[p.name] = value if isinstance(value, (str, int, float, bool, tuple, list, type(None))) else \
            (() if getattr(p, "multiple", False) else None)
    return out


def _as_recorded(name: str, value: Any) -> Any:
    """A parsed option as config.json records it."""
    if name == "datasets" and isinstance(value, str):
        return [d for d in value.split(",") if d]
    if name == "set_options":
        return normal_set_options(parse_overrides(value or ()))
    return list(value) if isinstance(value, tuple) else value


def _extract_root(opts: ReproduceOptions, dataset: str) -> str | None:
    """An explicit --root, else the default data/raw/<dataset> when it exists. A dataset
    made of another's files (ESC-10 of ESC-50's, see DOWNLOAD_AS) is served by that one's
    root too."""
    names = list(dict.fromkeys([dataset, DOWNLOAD_AS.get(dataset, dataset)]))
    for name in names:
        if name in opts.roots:
            return opts.roots[name]
    for name in names:
        if default_root(name).is_dir():
            return "" if name == dataset else str(default_root(name))  # "": extract's own default
    return None


def _missing_hint(recipe: Recipe, dataset: str, store: str) -> str:
    if dataset in DOWNLOAD_AS:
        name = DOWNLOAD_AS[dataset]
        get = (f"`audiofx download {name}` (into data/raw/{name}, which reproduce then uses) "
               f"or pass --root {dataset}=PATH")
    else:
        get = f"download it yourself (`audiofx datasets` shows the layout) and pass --root {dataset}=PATH"
    protocol = "".join(f" --set {v}" for v in recipe.protocol(dataset))
    return f"{dataset}: no {recipe.preset}{protocol} features in {store} and no root: {get}"


def make_plan(opts: ReproduceOptions, cli: click.Group) -> Plan:
    """The recipe's steps with the state of each (run, resume, done, ...), as commands of
    ``cli`` (audiofx's click group). Writes nothing."""
    if opts.recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {opts.recipe!r}", f"use one of {', '.join(RECIPES)}")
    recipe = RECIPES[opts.recipe]
    unknown = [d for d in opts.datasets if d not in recipe.datasets]
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} not in recipe {recipe.name}",
                          f"its datasets are {', '.join(recipe.datasets)}")
    datasets = tuple(d for d in recipe.datasets if not opts.datasets or d in opts.datasets)
    arch = opts.arch or recipe.arch
    notes = [f"{recipe.name}: {recipe.title}", *(f"choice: {c}" for c in recipe.choices),
             *(f"difference from the paper: {d}" for d in recipe.differences)]
    if arch != recipe.arch or opts.epochs_scale != 1:
        notes.append(f"smoke settings (backbone {arch}, epochs x {opts.epochs_scale}): not comparable with the paper")
    settings = recipe.settings
    for p in recipe.pretrain:
        if p.per_dataset:
            continue
        for d in set(p.pool or datasets) - set(unique_clips(p.pool or datasets)):
            notes.append(f"{d}'s clips are all in {get_adapter(d).subset_of}'s: the {p.method} pool takes them "
                         f"once, from {get_adapter(d).subset_of}")
    left_out = [s for s in settings if s.stage != "quoted" and s.source == "imagenet"
                and imagenet_arch(setting_arch(opts, recipe, s)) is None]
    if left_out:
        settings = tuple(s for s in settings if s not in left_out)
        notes.append(f"no ImageNet weights exist for arch {arch}: the ImageNet rows are left out")
    for name, spec in PUBLISHED.items():
        if any(s.source == name and spec.arch != imagenet_arch(setting_arch(opts, recipe, s)) for s in settings):
            settings = tuple(s for s in settings if s.source != name)
            notes.append(f"--init {name} exists for {spec.arch} only, not {arch}: its rows are left out")
    # Features to extract: the selected datasets and the recipe's own pretraining pools (FSD50K).
    wanted = list(dict.fromkeys([*datasets, *(d for p in recipe.pretrain for d in p.pool)]))
    ignored = [d for d in opts.roots if d not in {*wanted, *(DOWNLOAD_AS.get(w, w) for w in wanted)}]
    if ignored:
        notes.append(f"--root for {', '.join(ignored)} ignored: not a dataset of {recipe.name}")
    manifests = {d: _features(opts.store, d, recipe.preset, recipe.protocol(d)) for d in wanted}

    training = _training_steps(opts, cli, recipe, arch, datasets, settings, manifests)
    pending = [s for s in training if s.status != "done"]
    needed = {d for s in pending for d in (s.pool if s.kind == "pretrain" else (s.dataset,))}
    extract = _extract_steps(opts, recipe, wanted, manifests)
    for step in (s for s in extract if s.status == "missing" and s.dataset not in needed):
        step.status, step.note = "have", f"{step.dataset}: no features, but every run that reads them is finished"
    problems = [s.note for s in extract if s.status == "missing"]
    needs = dict.fromkeys((s.setting.source, s.arch) for s in pending if s.setting and s.setting.source in
                          ("imagenet", *PUBLISHED))
    for source, row_arch in needs:  # the weights files: offline, nothing can fetch them later
        given = _weights_of(opts, source, row_arch, arch)
        try:
            published_file(source, row_arch, Path(given) if given else None,
                           WEIGHTS_OPTIONS.get(source, ("", "--weights"))[1])
        except AudiofxError as err:
            hint = err.hint if row_arch == arch else err.hint.replace("--weights FILE", f"--weights {row_arch}=FILE")
            problems.append(f"{err.message} ({hint})")
    for step in pending:  # an option this audiofx lacks stops the run before anything trains
        try:
            _command_params(cli, step.kind, step.args[1:])
        except ConfigError as err:
            problems.append(err.message)
            break
    return Plan(recipe, arch, datasets, settings, extract + training, notes, problems,
                Path(opts.runs) / f"reproduce-{recipe.name}")


def setting_arch(opts: ReproduceOptions, recipe: Recipe, setting: Setting) -> str:
    """A row's backbone: --arch for every row, else the row's own (Zhou et al.'s AlexNet and
    ResNet-50), else the recipe's."""
    return opts.arch or setting.arch or recipe.arch


def _weights_of(opts: ReproduceOptions, source: str, arch: str, plan_arch: str) -> str | None:
    """The file given for a named init's weights on ``arch`` (None: the torch hub cache):
    --weights ARCH=FILE for that arch, else a plain --weights FILE for the plan's backbone."""
    if source == "imagenet" and imagenet_arch(arch) in opts.arch_weights:
        return opts.arch_weights[imagenet_arch(arch)]
    if arch != plan_arch:
        return None
    return getattr(opts, WEIGHTS_OPTIONS[source][0]) if source in WEIGHTS_OPTIONS else None


def _training_steps(opts: ReproduceOptions, cli: click.Group, recipe: Recipe, arch: str, datasets: tuple[str, ...],
                    settings: tuple[Setting, ...], manifests: dict[str, Any]) -> list[Step]:
    """pretrain, then finetune, then evaluate steps, each with its run's state."""
    runs = Path(opts.runs)
    common = ["--store", opts.store, "--runs", opts.runs]
    device = ["--device", opts.device] if opts.device else []
    progress = [] if opts.progress else ["--no-progress"]  # evaluate has no progress bar
    steps: list[Step] = []

    def add(kind: str, args: list[str], run_dir: Path, features: str | None = None, **kw) -> None:
        status = _run_state(kind, run_dir)
        if status in ("done", "resume"):  # checked before anything runs, not hours later
            diff = _differences(cli, kind, args[1:], run_dir, features)
            if diff:
                what = "finished" if status == "done" else "was started"
                raise ConfigError(f"run {run_dir} {what} with other settings ({'; '.join(diff)})",
                                  "pass another --runs folder, or delete that run to redo it")
        steps.append(Step(kind, args + (["--resume"] if status == "resume" else []), status, run_dir, **kw))

    # (pretrain ref, dataset or None for a pooled run) -> METHOD:RUN, for --init / --run
    pretrain_of: dict[tuple[str, str | None], str] = {}
    for p in recipe.pretrain:
        for ds in (datasets if p.per_dataset else (None,)):
            pool = (ds,) if ds else unique_clips(p.pool or datasets)
            name = pretrain_name(recipe, pool, p.ref)
            pretrain_of[(p.ref, ds)] = f"{p.method}:{name}"
            sets = [a for d in pool for a in _sets(recipe.protocol(d), d)]
            add("pretrain", ["pretrain", "--method", p.method, "--datasets", ",".join(pool), "--preset", recipe.preset,
                             *sets, "--arch", arch, *scale_epochs(p.args, opts.epochs_scale), *common, "--name", name,
                             *device, *progress], runs / "pretrain" / name, pool=pool)
    planned: set[str] = set()
    for stage in ("finetune", "evaluate"):
        for ds in datasets:
            for s in (s for s in settings if s.stage == stage):
                name = run_name(recipe, ds, s.slug)
                if name in planned:  # two rows of the paper that are one run (Zhou et al.'s Tables 2 and 3)
                    continue
                planned.add(name)
                ref = pretrain_of.get((s.source, ds)) or pretrain_of.get((s.source, None)) or s.source
                options = scale_epochs(s.args_for(ds), opts.epochs_scale)
                row_arch = setting_arch(opts, recipe, s)
                given = _weights_of(opts, s.source, row_arch, arch)
                weights = ["--weights", given] if given else []
                sets = _sets(recipe.protocol(ds))
                if stage == "finetune":
                    args = ["finetune", "--dataset", ds, "--init", ref, "--arch", row_arch, "--preset", recipe.preset,
                            *sets, *options, *weights, *common, "--name", name, *device, *progress]
                else:
                    args = ["evaluate", "--run", ref, "--dataset", ds, "--preset", recipe.preset, *sets, *options,
                            *weights, *common, "--name", name, *device]
                add(stage, args, runs / stage / name, dataset=ds, setting=s, folds=_fold_count(manifests[ds], ds, args),
                    arch=row_arch, features=(manifests[ds] or {}).get("feature_key"))
    return steps


def _extract_steps(opts: ReproduceOptions, recipe: Recipe, wanted: list[str], manifests: dict[str, Any]) -> list[Step]:
    """extract from a root when there is one; else the features must be in the store already."""
    steps = []
    for ds in wanted:
        root = _extract_root(opts, ds)
        args = ["extract", "--dataset", ds, "--preset", recipe.preset, *_sets(recipe.protocol(ds)), "--store", opts.store]
        args += ["--root", root] if root else []
        if opts.device in ("cpu", "cuda") or (opts.device or "").startswith("cuda:"):
            args += ["--device", opts.device]  # extract has no "auto"
        args += [] if opts.progress else ["--no-progress"]
        if root is not None:
            steps.append(Step("extract", args, "run", dataset=ds))
        elif manifests[ds] is not None:
            steps.append(Step("extract", args, "have", dataset=ds,
                              note=f"{ds}: {recipe.preset} features found in {opts.store}"))
        else:
            steps.append(Step("extract", args, "missing", dataset=ds, note=_missing_hint(recipe, ds, opts.store)))
    return steps


def plan_lines(plan: Plan) -> list[str]:
    """The dry run: comments (#) and one `audiofx ...` command per line, in order, so the
    output is also a shell script."""
    lines = [f"# {n}" for n in plan.notes]
    for step in plan.steps:
        if step.status == "have":
            lines.append(f"# skip ({step.note}): {step.command}")
        elif step.status == "done":
            lines.append(f"# skip (finished: {step.run_dir}): {step.command}")
        else:
            if step.status == "missing":
                lines.append(f"# missing: {step.note}")
            elif step.status == "restart":
                lines.append(f"# unfinished {step.run_dir} will be moved aside and started again")
            elif step.status == "resume":
                lines.append(f"# resumes the unfinished {step.run_dir}")
            lines.append(step.command)
    noted = {s.note for s in plan.steps}
    lines += [f"# problem: {p}" for p in plan.problems if p not in noted]
    lines.append("# " + count_line(plan))
    return lines


def count_line(plan: Plan) -> str:
    steps = [s for s in plan.steps if s.kind in TRAINING]
    n = {k: sum(s.kind == k for s in steps) for k in TRAINING}
    folds: dict[str, int] = {}  # a dataset's test folds (a --fold K run has one of them)
    for s in steps:
        if s.dataset:
            folds[s.dataset] = max(folds.get(s.dataset, 0), s.folds or 0)
    fold_runs = {k: sum(s.folds or 0 for s in steps if s.kind == k) for k in ("finetune", "evaluate")}
    text = (f"{len(steps)} training runs: {n['pretrain']} pretrain, {n['finetune']} finetune, {n['evaluate']} evaluate; "
            "each finetune/evaluate --fold all is one run over its dataset's folds ("
            + ", ".join(f"{d}: {f}" for d, f in folds.items()) + f"): {fold_runs['finetune']} finetune and "
            f"{fold_runs['evaluate']} evaluate folds")
    done = sum(s.status == "done" for s in steps)
    resume = sum(s.status in ("resume", "restart") for s in steps)
    if done or resume:
        text += f"; {done} already finished, {resume} unfinished"
    return text


def execute(plan: Plan, cli: click.Group, say: Callable[[str], None] = print) -> None:
    """Run every step that is not done, in order, through the real CLI (``cli``) in this process."""
    if plan.problems:
        for p in plan.problems:
            say(f"cannot start: {p}")
        first = plan.problems[0]
        raise AudiofxError(f"reproduce {plan.recipe.name} cannot start: {len(plan.problems)} problem(s), first: {first}",
                           "fix them (see above), or leave datasets out with --datasets")
    for n in plan.notes:
        say(f"note: {n}")
    total = len(plan.steps)
    for i, step in enumerate(plan.steps, 1):
        tag = f"[{i}/{total}]"
        if step.status == "have":
            say(f"{tag} skip, {step.note}: {step.command}")
            continue
        if step.status == "done":
            say(f"{tag} skip, finished ({step.run_dir}): {step.command}")
            continue
        if step.status == "restart":
            aside = step.run_dir.with_name(f"{step.run_dir.name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
            step.run_dir.rename(aside)
            say(f"{tag} the unfinished {step.run_dir} was moved to {aside}; starting it again")
        say(f"{tag} {'resume' if step.status == 'resume' else 'run'}: {step.command}")
        cli.main(args=list(step.args), prog_name="audiofx", standalone_mode=False)


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def ours(setting: Setting, dataset: str, run_dir: Path | None) -> str:
    """A finished run read with the row's metric (recipes.METRICS), in %, mean ± std over test
    folds; "-" before the run has finished."""
    summary = _summary(run_dir) if run_dir is not None else None
    if summary is None:
        return "-"
    m = summary.get("metric", "acc")
    last = headline(summary)
    if setting.metric == "curve":
        if f"curve_selected_{m}_mean" not in summary:
            return f"{last.text()} [last epoch: the run has no validation curve]"
        return (f"{_pct(summary[f'curve_selected_{m}_mean'], summary[f'curve_selected_{m}_std'])} "
                f"[epoch {summary['curve_selected_epoch']} on val; last {last.text()}]")
    if setting.metric == "kcv":
        if f"{m}_kcv_mean" not in summary:
            return f"{last.text()} [the run chose no k by cross-validation]"
        ks = summary.get("k") or []
        return f"{_pct(summary[f'{m}_kcv_mean'], summary[f'{m}_kcv_std'])}" + (f" [k {ks[0]}: {last.text()}]" if ks else "")
    if setting.metric != "epoch":
        return last.text()
    epoch = setting.epoch_for(dataset)
    if epoch is None:  # the paper reads no epoch for this dataset
        return f"{last.text()} [last epoch]"
    at = [r[f"test_{m}"] for r in Run(run_dir).metrics() if r.get("event") == "epoch" and r["epoch"] == epoch]
    if len(at) != last.folds:  # a shorter run (--epochs-scale): its last epoch, said so
        return f"{last.text()} [last epoch; the paper's epoch {epoch} not reached]"
    std = float(np.std(at, ddof=1)) if len(at) > 1 else 0.0
    return f"{_pct(float(np.mean(at)), std)} [epoch {epoch}; last {last.text()}]"


def _cell(setting: Setting, dataset: str, run_dir: Path | None) -> str:
    paper = setting.paper_number(dataset)
    theirs = f"(paper {paper})" if paper else "(no number in the paper)"
    if setting.stage == "quoted":
        return f"not run {theirs}"
    return f"{ours(setting, dataset, run_dir)} {theirs}"


METRIC_WORDS = {"last": "last epoch", "curve": "epoch selected on validation", "kcv": "k by CV on the training folds",
                "epoch": "at the paper's epoch"}


def results_table(plan: Plan) -> str:
    """Rows = settings, columns = datasets, each cell "ours (paper N)": ours read with the row's
    metric (the last epoch, the epoch the validation curve selects, k by cross-validation, or
    one epoch of the curve), mean ± std over folds (in %), from each run's records."""
    runs = {(s.dataset, s.setting.slug): s.run_dir for s in plan.steps if s.setting}
    header = ["setting", "ours", *plan.datasets]
    rows = [[s.label, "quoted" if s.stage == "quoted" else
             (METRIC_WORDS[s.metric] if s.stage == "finetune" or s.metric == "kcv" else "frozen"),
             *(_cell(s, d, runs.get((d, s.slug))) for d in plan.datasets)] for s in plan.settings]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def per_class_f1(run_dir: Path | None, fold: str) -> dict[str, float] | None:
    """F1 of each class on one test fold, from a finished run's saved predictions of it."""
    from sklearn.metrics import f1_score

    if run_dir is None or _summary(run_dir) is None or not (run_dir / "per_class.json").is_file():
        return None
    saved = Run(run_dir).predictions().get(fold)
    if saved is None or saved["y_true"].ndim != 1:  # single-label sets only
        return None
    classes = json.loads((run_dir / "per_class.json").read_text())["classes"]
    f1 = f1_score(saved["y_true"], saved["y_pred"], labels=list(range(len(classes))), average=None, zero_division=0)
    return dict(zip(classes, f1.tolist()))


def class_table(plan: Plan, table: ClassTable) -> str:
    """Rows = classes, columns = the table's settings, each cell "ours (paper F1)"."""
    runs = {(s.dataset, s.setting.slug): s.run_dir for s in plan.steps if s.setting}
    labels = {s.slug: s.label for s in plan.settings}
    columns = [(slug, dict(cells)) for slug, cells in table.f1 if slug in labels]
    ours = {slug: per_class_f1(runs.get((table.dataset, slug)), table.fold) for slug, _ in columns}
    classes = list(dict.fromkeys(c for _, cells in columns for c in cells))
    header = ["class", *(labels[slug] for slug, _ in columns)]
    rows = [[c, *(f"{'-' if ours[slug] is None or c not in ours[slug] else f'{ours[slug][c]:.3f}'} (paper "
                  f"{cells.get(c, 'n/a')})" for slug, cells in columns)] for c in classes]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([f"{table.title} (ours from the runs' saved predictions of fold {table.fold})", "",
                      line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows),
                      *([f"note: {table.note}"] if table.note else [])])


def table_text(plan: Plan) -> str:
    per_class = [class_table(plan, t) for t in plan.recipe.class_tables if t.dataset in plan.datasets]
    return "\n".join([
        f"{plan.recipe.name}: accuracy %, ours as mean ± std over test folds read as the 'ours' column says, the "
        "paper's number in parentheses", "", results_table(plan), *(f"\n{t}" for t in per_class), "",
        *(f"note: {n}" for n in plan.notes[1:])])


def reproduce(opts: ReproduceOptions, cli: click.Group, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Plan the recipe as commands of ``cli`` (audiofx's click group), print the plan (--dry-run)
    or run it, then write the table and the report."""
    plan = make_plan(opts, cli)
    if opts.dry_run:
        for line in plan_lines(plan):
            say(line)
        return {"plan": plan}
    execute(plan, cli, say)
    text = table_text(plan)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    (plan.out_dir / "table.md").write_text(text + "\n")
    result: dict[str, Any] = {"plan": plan, "table": text, "table_path": plan.out_dir / "table.md", "report": None}
    finished = [s.run_dir for s in plan.steps if s.kind in TRAINING and _run_state(s.kind, s.run_dir) == "done"]
    if finished:
        result["report"] = build_report(finished, plan.out_dir / "report", store=opts.store, say=say)
    return result
