"""`audiofx reproduce`: the dry-run plans of every recipe parse with the real CLI and carry the
papers' settings; a tiny shin2021 run on official-layout fixtures ends with a table whose
numbers are the runs' summaries, and a rerun skips, resumes and restarts the right runs."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from audiofx.cli import cli
from audiofx.recipes import RECIPES
from audiofx.reproduce import scale_epochs
from audiofx.training.stages.runs import Run
from tests.conftest import assert_one_line_error, run_cli, run_process

EXPECTED_RUNS = {  # (pretrain, finetune, evaluate) runs per recipe
    "shin2021": (1, 12, 6),  # SimCLR in-domain; 4 inits x 3 datasets; linear (ImageNet SimCLR, in-domain) x 3
    "hornauer2021": (5, 12, 4),  # NPID per dataset (phase 1) and on the pool; npid + imagenet + scratch x 4; 5-NN x 4
    "zhou2019": (0, 12, 0),  # Table 1's six, Table 2's four, Table 3's two more (its 6-fragment row is Table 2's)
    "lin2022": (2, 16, 16),  # NPID + MoCo; 4 inits x 4 datasets; linear + kNN of both x 4
}


def dry_run(*args: str) -> list[str]:
    result = CliRunner().invoke(cli, ["reproduce", *args, "--dry-run"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output.splitlines()


def commands(lines: list[str]) -> list[tuple[str, dict]]:
    """Every command line parsed by the click command it names: an option the CLI lacks
    raises here (make_context does the full parse, --help-free)."""
    out = []
    for line in lines:
        if line.startswith("#"):
            continue
        argv = shlex.split(line)
        assert argv[0] == "audiofx", line
        out.append((argv[1], cli.commands[argv[1]].make_context(argv[1], argv[2:]).params))
    return out


def run_count(lines: list[str]) -> tuple[int, int, int, int]:
    m = re.search(r"^# (\d+) training runs: (\d+) pretrain, (\d+) finetune, (\d+) evaluate", "\n".join(lines), re.M)
    assert m, lines[-1]
    return tuple(int(g) for g in m.groups())


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_dry_run_prints_commands_that_parse_and_counts_them(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = dry_run(recipe, "--store", "store", "--runs", "runs")
    assert all(line.startswith(("# ", "audiofx ")) for line in lines), lines  # also a shell script
    parsed = commands(lines)
    kinds = [k for k, _ in parsed]
    datasets = RECIPES[recipe].datasets
    assert kinds[:kinds.index(next(k for k in kinds if k != "extract"))] == ["extract"] * (
        len(datasets) + (recipe == "lin2022"))  # FSD50K for lin2022's pretraining
    total, *per_kind = run_count(lines)
    assert tuple(per_kind) == EXPECTED_RUNS[recipe]
    assert total == sum(per_kind) == sum(k in ("pretrain", "finetune", "evaluate") for k in kinds)
    # stages in order: extract, pretrain, finetune, evaluate
    order = ["extract", "pretrain", "finetune", "evaluate"]
    assert kinds == sorted(kinds, key=order.index)
    names = [p["name"] for k, p in parsed if k != "extract"]
    assert len(set(names)) == len(names) and all(n.startswith(f"{recipe}-") for n in names)
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()  # touches nothing


def test_dry_run_commands_carry_the_papers_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shin = commands(dry_run("shin2021"))
    pre = [p for k, p in shin if k == "pretrain"]
    assert len(pre) == 1 and pre[0]["method"] == "simclr" and pre[0]["datasets"] == "gtzan,esc50,urbansound8k"
    pool = "simclr:" + pre[0]["name"]
    ft = [p for k, p in shin if k == "finetune"]
    assert sorted({p["init"] for p in ft}) == sorted(["scratch", "imagenet", "imagenet-simclr", pool])
    for p in ft:
        assert (p["arch"], p["epochs"], p["batch_size"], p["lr"], p["weight_decay"], p["fold"], p["preset"]) == (
            "resnet50", 70, 32, 1e-4, 1e-3, "all", "shin2021")
        slug = {"imagenet-simclr": "simclr-imagenet"}.get(p["init"], p["init"].split(":")[0])
        assert p["name"] == f"shin2021-{p['dataset']}-{slug}"
    ev = [p for k, p in shin if k == "evaluate"]
    assert {(p["run_spec"], p["mode"], p["dataset"]) for p in ev} == {
        (run, "linear", d) for d in ("gtzan", "esc50", "urbansound8k") for run in (pool, "imagenet-simclr")}

    # Table 2's probe: the FC layer trained with the paper's settings
    assert {(p["probe"], p["linear_epochs"], p["linear_lr"], p["linear_weight_decay"]) for p in ev} == {
        ("sgd", 70, 1e-4, 1e-3)}
    # the protocols: GTZAN's one 80/20 split, UrbanSound8K resized to its frames; the pool names each set
    assert {p["dataset"]: p["overrides"] for k, p in shin if k == "extract"} == {
        "gtzan": ("ratios=80/0/20",), "esc50": (), "urbansound8k": ("fit=resize",)}
    assert pre[0]["set_options"] == ("gtzan:ratios=80/0/20", "urbansound8k:fit=resize")
    assert {p["set_options"] for p in ft if p["dataset"] == "urbansound8k"} == {("fit=resize",)}

    hornauer = commands(dry_run("hornauer2021"))
    pooled, *phase1 = sorted((p for k, p in hornauer if k == "pretrain"), key=lambda p: "," not in p["datasets"])
    assert pooled["arch"] == "esresnet50"  # "the best performing ESResNet with attention"
    assert (pooled["method"], pooled["nce_k"], pooled["temperature"], pooled["epochs"], pooled["batch_size"],
            pooled["datasets"], pooled["preset"], pooled["set_options"], pooled["hold_out_fold"]) == (
        "npid", 64, 0.4, 200, 64, "esc50,urbansound8k,dcase2013", "hornauer2021", ("dcase2013:folds=2",), None)
    assert any("esc10's clips are all in esc50's" in line for line in dry_run("hornauer2021"))
    # phase 1: NPID on each dataset alone without fold 1, then weighted 5-NN on fold 1
    assert sorted((p["datasets"], p["hold_out_fold"]) for p in phase1) == [
        (d, "1") for d in sorted(("esc10", "esc50", "urbansound8k", "dcase2013"))]
    knn = [p for k, p in hornauer if k == "evaluate"]
    assert {(p["dataset"], p["run_spec"], p["fold"], p["k"]) for p in knn} == {
        (d, f"npid:hornauer2021-{d}-phase1-npid", "1", 5) for d in ("esc10", "esc50", "urbansound8k", "dcase2013")}
    assert {p.get("set_options", p.get("overrides")) for k, p in hornauer
            if k != "pretrain" and p["dataset"] == "dcase2013"} == {("folds=2",)}  # extract calls its --set overrides

    zhou = [p for k, p in commands(dry_run("zhou2019")) if k == "finetune"]
    assert [(p["arch"], p["init"], p["fragments"], p["channel_fusion"], p["head"], p["input_channel"]) for p in zhou] == [
        *((arch, init, 1, False, "linear", "mid") for arch in ("alexnet", "vgg16", "resnet50")
          for init in ("scratch", "imagenet")),
        *(("vgg16", "imagenet", n, False, "linear", "mid") for n in (3, 6, 9, 12)),
        ("vgg16", "imagenet", 6, True, "linear", None), ("vgg16", "imagenet", 6, True, "mlp-attn", None)]
    assert {(p["dataset"], p["preset"]) for p in zhou} == {("tut2018", "zhou2019")}

    lin = commands(dry_run("lin2022"))
    assert {(p["method"], p["datasets"]) for k, p in lin if k == "pretrain"} == {("npid", "fsd50k"), ("moco", "fsd50k")}
    assert {(p["epochs"], p["val_split"], p["preset"]) for k, p in lin if k == "finetune"} == {(30, 0.15, "lin2022")}
    modes = [(p["run_spec"].split(":")[0], p["mode"]) for k, p in lin if k == "evaluate" and p["dataset"] == "gtzan"]
    assert sorted(modes) == sorted([("npid", "linear"), ("moco", "linear"), ("npid", "knn"), ("moco", "knn")])
    # Lin's K per dataset beside 200, k by cross-validation reported by every kNN run
    assert {p["dataset"]: p["k"] for k, p in lin if k == "evaluate" and p["mode"] == "knn"} == {
        "esc50": (35, 200), "urbansound8k": 200, "dcase2013": (18, 200), "gtzan": (35, 200)}
    assert {p["dataset"]: p["overrides"] for k, p in lin if k == "extract"} == {
        "esc50": (), "urbansound8k": (), "dcase2013": ("folds=2",), "gtzan": ("ratios=70/15/15",), "fsd50k": ("augment_copies=3",)}


def test_epochs_scale_multiplies_every_epoch_budget(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def epochs(*args: str) -> dict[str, set]:
        out: dict[str, set] = {}
        for kind, p in commands(dry_run("shin2021", *args)):
            if kind != "extract":
                out.setdefault(kind, set()).add(p["epochs"] if kind != "evaluate" else p["linear_epochs"])
        return out

    assert epochs() == {"pretrain": {200}, "finetune": {70}, "evaluate": {70}}
    assert epochs("--epochs-scale", "0.5") == {"pretrain": {100}, "finetune": {35}, "evaluate": {35}}
    assert epochs("--epochs-scale", "0.001") == {"pretrain": {1}, "finetune": {1}, "evaluate": {1}}
    # rounded half up, at least 1; nothing but --epochs values changes
    assert scale_epochs(["--epochs", "70", "--batch-size", "32"], 0.05) == ["--epochs", "4", "--batch-size", "32"]
    assert scale_epochs(["--epochs", "70"], 0.02) == ["--epochs", "1"]
    assert scale_epochs(["--k", "200"], 0.01) == ["--k", "200"]


def test_weights_name_their_backbone_by_any_arch_that_starts_from_imagenet():
    from audiofx.reproduce import parse_weights

    # esresnet50 starts from resnet50's ImageNet checkpoint: its file is resnet50's
    assert parse_weights(["r.pt", "alexnet=a.pt", "esresnet50=e.pt"]) == {
        "weights": "r.pt", "arch_weights": {"alexnet": "a.pt", "resnet50": "e.pt"}}
    assert parse_weights(["dir/x=y.pt"]) == {"weights": "dir/x=y.pt", "arch_weights": {}}  # not an arch: a file


def test_options_pass_through_to_the_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "r18.pth"
    weights.write_bytes(b"")
    lines = dry_run("shin2021", "--datasets", "esc50", "--arch", "resnet18", "--weights", str(weights), "--device", "cuda",
                    "--root", "esc50=/data/ESC-50-master", "--no-progress", "--store", "s", "--runs", "r")
    parsed = commands(lines)
    assert [k for k, _ in parsed] == ["extract", "pretrain", "finetune", "finetune", "finetune", "evaluate"]
    extract = parsed[0][1]
    assert (str(extract["root"]), extract["device"], extract["store"], extract["no_progress"]) == (
        "/data/ESC-50-master", "cuda", "s", True)
    for kind, p in parsed[1:]:
        assert (p["device"], p["store"], p["runs_root"], p["dataset"] if kind != "pretrain" else p["datasets"]) == (
            "cuda", "s", "r", "esc50")
        assert kind == "evaluate" or (p["arch"], p["no_progress"]) == ("resnet18", True)
        assert kind != "finetune" or p["weights"] == (str(weights) if p["init"] == "imagenet" else None)
    assert parsed[1][1]["name"] == "shin2021-esc50-simclr"
    assert "# 5 training runs: 1 pretrain, 3 finetune, 1 evaluate" in "\n".join(lines)
    assert "(esc50: 5)" in lines[-1]

    simclr = tmp_path / "resnet50-1x.pth"
    simclr.write_bytes(b"")
    paper = dry_run("shin2021", "--datasets", "esc50", "--simclr-weights", str(simclr), "--weights", str(weights))
    rows = [(k, p) for k, p in commands(paper) if k != "extract" and (p.get("init") or p.get("run_spec")) ==
            "imagenet-simclr"]
    assert [(k, p["weights"], p["name"]) for k, p in rows] == [
        ("finetune", str(simclr), "shin2021-esc50-simclr-imagenet"),
        ("evaluate", str(simclr), "shin2021-esc50-simclr-imagenet-linear")]
    assert not any("problem" in line for line in paper)  # every weights file is there: nothing stops the run
    missing = dry_run("shin2021", "--datasets", "esc50", "--weights", str(weights))
    assert any(line.startswith("# problem: --init imagenet-simclr needs") and "--simclr-weights FILE" in line
               and "tonylins/simclr-converter" in line for line in missing)

    tiny = dry_run("shin2021", "--arch", "tiny")  # no ImageNet weights for tiny: those rows are left out
    assert not any(p.get("init") == "imagenet" for _, p in commands(tiny))
    assert any("no ImageNet weights exist for arch tiny" in line for line in tiny)


def test_esc10_is_extracted_from_the_esc50_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    given = commands(dry_run("hornauer2021", "--datasets", "esc10", "--root", "esc50=/data/ESC-50-master"))
    assert given[0][0] == "extract" and (given[0][1]["dataset"], str(given[0][1]["root"])) == (
        "esc10", "/data/ESC-50-master")
    (tmp_path / "data" / "raw" / "esc50").mkdir(parents=True)  # `audiofx download esc50` put it there
    default = commands(dry_run("hornauer2021", "--datasets", "esc10"))
    assert str(default[0][1]["root"]) == "data/raw/esc50"
    ignored = dry_run("hornauer2021", "--datasets", "esc10", "--root", "gtzan=/x")
    assert any("--root for gtzan ignored" in line for line in ignored)


def test_table_has_every_number_the_papers_print_and_says_how_ours_is_read(tmp_path, monkeypatch):
    from audiofx.reproduce import ReproduceOptions, make_plan, results_table

    monkeypatch.chdir(tmp_path)

    def rows(recipe: str) -> dict[str, list[str]]:
        return table(results_table(make_plan(ReproduceOptions(recipe, store="s", runs="r"), cli)))

    lin = rows("lin2022")
    assert lin[""] == ["ours", "esc50", "urbansound8k", "dcase2013", "gtzan"]
    assert lin["NPID KNN (k by cross-validation)"] == ["k by CV on the training folds", "- (paper 36.9)",
                                                       "- (paper 56.6)", "- (paper 72.5)", "- (paper 47.3)"]
    assert lin["MoCo Fine Tune"] == ["epoch selected on validation", "- (paper 74.2)", "- (paper 73.0)",
                                     "- (paper 79.5)", "- (paper 57.5)"]
    assert lin["NPID Freeze (frozen linear)"][1:] == ["- (paper 49.3)", "- (paper 55.0)", "- (paper 65.0)",
                                                      "- (paper 42.5)"]
    # every cell of Lin's Tables 3.1, 3.2, 3.4 and 3.5 has the paper's number: 8 settings x 4 datasets
    assert sum("(paper " in c for row, cells in lin.items() if row for c in cells) == 32
    zhou = rows("zhou2019")
    assert sum("(paper " in c for row, cells in zhou.items() if row for c in cells) == 14  # Tables 1-3, all of them
    assert zhou["Table 3: DCASE 2018 baseline [26] (quoted by the paper, not run)"] == ["quoted", "not run (paper 59.7)"]
    hornauer = rows("hornauer2021")
    assert hornauer["Fig. 4: DLS (NPID on the pool), all layers fine-tuned"] == [
        "at the paper's epoch", "- (paper ≈80)", "- (paper >60)", "- (no number in the paper)", "- (paper ≈50)"]
    assert rows("shin2021")["Table 1: ImageNet supervised init"] == [
        "last epoch", "- (paper 90.50)", "- (paper 90.55)", "- (paper 83.34)"]
    # Lin's Table 3.3, F1 per class on UrbanSound8K fold 1: 10 classes x 8 settings, each with its number
    from audiofx.reproduce import table_text

    text = table_text(make_plan(ReproduceOptions("lin2022", store="s", runs="r"), cli))
    per_class = text[text.index("Table 3.3"):]
    assert per_class.count("(paper 0.") == 80 and "| gun_shot " in per_class and "copy error" in per_class


def test_user_errors_are_one_line(tmp_path):
    proc = run_cli("reproduce", "shin2021", "--datasets", "esc50", "--arch", "tiny", "--store", "s", "--runs", "r",
                   cwd=tmp_path)
    assert_one_line_error(proc, "cannot start", "esc50: no shin2021 features", "audiofx download esc50",
                          "--root esc50=PATH")
    assert not (tmp_path / "r").exists()
    assert_one_line_error(run_cli("reproduce", "zhou2019", "--datasets", "esc50", cwd=tmp_path),
                          "esc50 not in recipe zhou2019", "tut2018")
    assert_one_line_error(run_cli("reproduce", "shin2021", "--root", "esc50", cwd=tmp_path), "not DATASET=PATH")


# -- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """shin2021 with a tiny CNN and every epoch budget x 0.01 (1-2 epochs) on fixtures in the
    official layouts: ESC-50 (15 clips, 5 folds) extracted by reproduce from --root, and
    UrbanSound8K (10 clips, 10 folds) already in the store (extracted beforehand with short
    clips, to keep the CPU time down), so both the extract and the features-found paths run."""
    from audiofx.pipeline.extract import ExtractRequest, extract
    from tests import layouts as L

    base = tmp_path_factory.mktemp("reproduce")
    L.make_esc50(base / "ESC-50-master", categories=L.ESC50_CATEGORIES[:3])
    extract(ExtractRequest(dataset="urbansound8k", root=L.make_urbansound8k(base / "UrbanSound8K", per_fold=1),
                           store=str(base / "features"), overrides={"clip_seconds": 0.5, "frames": 20, "fit": "resize"},
                           workers=1, progress=False), on_event=lambda m: None)
    common = ["shin2021", "--epochs-scale", "0.01", "--arch", "tiny", "--datasets", "esc50,urbansound8k",
              "--store", "features", "--runs", "runs", "--no-progress"]
    roots = ["--root", "esc50=ESC-50-master"]
    plan = run_process("reproduce", *common, *roots, "--dry-run", cwd=base)
    assert plan.returncode == 0, plan.stderr
    proc = run_cli("reproduce", *common, *roots, cwd=base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base, common, plan.stdout.splitlines(), proc.stdout


def summary(run: Path) -> dict:
    return Run(run).summary()


def table(stdout: str) -> dict[str, list[str]]:
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows[1:])} | {
        "": header[1:]}


def expected_cell(run: Path, paper: str) -> str:
    s = summary(run)
    mean, std = (s["last_acc_mean"], s["last_acc_std"]) if "last_acc_mean" in s else (s["acc_mean"], s["acc_std"])
    return f"{100 * mean:.2f} ± {100 * std:.2f} " + (f"(paper {paper})" if paper else "(no number in the paper)")


def assert_table_matches_runs(stdout: str, runs: Path) -> None:
    t = table(stdout)
    assert t[""] == ["ours", "esc50", "urbansound8k"]
    expected = {  # row -> (run-name part, finetune or evaluate, the paper's ESC-50 and UrbanSound8K)
        "Table 1: ResNet-50 from scratch": ("scratch", "finetune", "78.25", "76.11"),
        "extra, not in the paper: SimCLR pretrained on the pooled audio": ("simclr", "finetune", "", ""),
        "extra, not in the paper: SimCLR on the pooled audio, frozen linear": ("simclr-linear", "evaluate", "", ""),
    }
    assert set(t) - {""} == set(expected)  # the ImageNet rows are left out for --arch tiny
    for row, (slug, stage, *paper) in expected.items():
        assert t[row][1:] == [expected_cell(runs / stage / f"shin2021-{ds}-{slug}", p)
                              for ds, p in zip(("esc50", "urbansound8k"), paper)]


def test_reproduce_runs_the_dry_run_commands_and_ends_with_the_table(reproduced):
    base, _, plan, stdout = reproduced
    planned = [line for line in plan if line.startswith("audiofx ")]
    ran = re.findall(r"^\[\d+/\d+\] run: (audiofx .*)$", stdout, re.M)
    assert ran == planned and len(ran) == 8  # 1 extract, 1 pretrain, 4 finetunes, 2 evaluates
    assert re.search(r"^\[2/9\] skip, urbansound8k: shin2021 features found in features: audiofx extract", stdout, re.M)
    runs = base / "runs"
    assert (runs / "pretrain" / "shin2021-esc50+urbansound8k-simclr" / "checkpoints" / "final.pt").is_file()
    assert summary(runs / "finetune" / "shin2021-urbansound8k-scratch")["n_folds"] == 10
    assert summary(runs / "evaluate" / "shin2021-esc50-simclr-linear")["n_folds"] == 5
    assert_table_matches_runs(stdout, runs)
    assert "| extra, not in the paper: SimCLR pretrained on the pooled audio" in (runs / "reproduce-shin2021" / "table.md").read_text()
    # what differs from the paper is said: the ImageNet-SimCLR rows need a ResNet-50
    assert "--init imagenet-simclr exists for resnet50 only, not tiny: its rows are left out" in stdout
    # F1 per class of one test fold, from the run's saved predictions (Lin's Table 3.3 reads them so)
    import numpy as np

    from audiofx.reproduce import per_class_f1

    run = runs / "finetune" / "shin2021-urbansound8k-scratch"
    saved = Run(run).predictions()["1"]
    f1 = per_class_f1(run, "1")
    for c, name in enumerate(json.loads((run / "per_class.json").read_text())["classes"]):
        tp = np.sum((saved["y_pred"] == c) & (saved["y_true"] == c))
        wrong = np.sum(saved["y_pred"] == c) + np.sum(saved["y_true"] == c) - 2 * tp
        assert f1[name] == pytest.approx(tp / (tp + wrong / 2) if tp else 0.0)


def test_rerun_skips_finished_runs_and_resumes_unfinished_ones(reproduced):
    base, common, _, first = reproduced
    runs = base / "runs"
    again = run_cli("reproduce", *common, "--dry-run", cwd=base)  # no --root: the features are found
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("# skip (finished") == 7 and again.stdout.count("shin2021 features found in features)") == 2
    assert "7 already finished, 0 unfinished" in again.stdout
    assert not [line for line in again.stdout.splitlines() if line.startswith("audiofx ")]

    # Interrupted runs: a finetune without its summary resumes; an evaluate starts again.
    for run in (runs / "finetune" / "shin2021-esc50-scratch", runs / "evaluate" / "shin2021-urbansound8k-simclr-linear"):
        log = run / "metrics.jsonl"
        log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if '"summary"' not in line))
    proc = run_cli("reproduce", *common, cwd=base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert len(re.findall(r"^\[\d+/9\] skip, finished", out, re.M)) == 5
    assert re.search(r"^\[\d+/9\] resume: audiofx finetune .*--name shin2021-esc50-scratch --no-progress --resume$", out, re.M)
    assert "fold 1: already done" in out
    assert "shin2021-urbansound8k-simclr-linear was moved to" in out
    assert list((runs / "evaluate").glob("shin2021-urbansound8k-simclr-linear.unfinished-*"))
    assert_table_matches_runs(out, runs)
    for row in ("Table 1: ResNet-50 from scratch", "extra, not in the paper: SimCLR pretrained on the pooled audio"):  # the same finetune runs' numbers
        assert table(out)[row] == table(first)[row]

    # Without the features (another store) nothing is missing once every run that reads them is done.
    elsewhere = run_cli("reproduce", *[a if a != "features" else "empty" for a in common], "--dry-run", cwd=base)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert elsewhere.stdout.count("no features, but every run that reads them is finished") == 2
    assert "# missing" not in elsewhere.stdout and "# problem" not in elsewhere.stdout

    # A finished run made with other settings never fills the table.
    changed = run_cli("reproduce", *common[:2], "0.03", *common[3:], "--dry-run", cwd=base)
    assert_one_line_error(changed, "finished with other settings", "epochs 2, not 6", "another --runs")

    # A run made before an option the recipe now gives existed (its config.json lacks it), or on
    # another feature set than the recipe's, never fills the table either.
    config_path = runs / "finetune" / "shin2021-urbansound8k-scratch" / "config.json"
    config = json.loads(config_path.read_text())
    old = {k: v for k, v in config.items() if k != "set_options"}
    config_path.write_text(json.dumps(old))
    before = run_cli("reproduce", *common, "--dry-run", cwd=base)
    assert_one_line_error(before, "set_options not recorded (made before the option existed)")
    config_path.write_text(json.dumps({**config, "key": "0123456789abcdef"}))
    other = run_cli("reproduce", *common, "--dry-run", cwd=base)
    assert_one_line_error(other, "features 0123456789abcdef, not the recipe's")
    config_path.write_text(json.dumps(config))
