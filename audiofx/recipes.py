"""The papers' recipes as data: which features, which pretraining, which fine-tuning and
evaluation runs, and the numbers each paper reports (DESIGN.md section 5, copied exactly as
strings so that "90.50" stays "90.50"). `audiofx reproduce` (audiofx/reproduce.py)
turns a recipe into `audiofx ...` commands; nothing here imports torch.

A recipe's stages are argument lists of the real CLI commands. What the runner adds to them
is only plumbing: --dataset/--preset/--arch, the run name, --store/--runs/--device,
--weights / --simclr-weights for the ImageNet inits, --no-progress and --resume.
"""

from __future__ import annotations

from dataclasses import dataclass

# Shin/Palanisamy fine-tuning: finetune's defaults, spelled out so the command says them.
SHIN_FINETUNE = ("--fold", "all", "--epochs", "70", "--batch-size", "32", "--lr", "1e-4", "--weight-decay", "1e-3")
LINEAR = ("--mode", "linear", "--fold", "all", "--epochs", "100")
KNN = ("--mode", "knn", "--fold", "all", "--k", "200")


@dataclass(frozen=True)
class Pretrain:
    """One self-supervised pretraining run over a pool of datasets."""

    method: str  # npid | simclr | moco
    args: tuple[str, ...]  # pretrain options besides --method/--datasets/--arch/--preset
    pool: tuple[str, ...] = ()  # () = the recipe's (selected) datasets, pooled


@dataclass(frozen=True)
class Setting:
    """One row of the paper's table: a finetune or evaluate run on each dataset."""

    label: str  # the row as the table shows it
    slug: str  # the run-name part: <recipe>-<dataset>-<slug>
    stage: str  # finetune | evaluate
    source: str  # finetune: its --init (scratch, imagenet, imagenet-simclr, a pretrain method); evaluate: its --run
    args: tuple[str, ...]  # the stage's other options (epochs, mode, ...)
    paper: tuple[tuple[str, str], ...] = ()  # (dataset, the paper's accuracy %) as printed in the paper

    def paper_number(self, dataset: str) -> str | None:
        return dict(self.paper).get(dataset)


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str  # the paper
    preset: str  # feature preset for extract and for every training stage
    arch: str  # backbone (--arch overrides it)
    datasets: tuple[str, ...]  # the table's columns
    pretrain: tuple[Pretrain, ...]
    settings: tuple[Setting, ...]
    notes: tuple[str, ...] = ()  # differences from the paper, printed with the plan and the table


def _ft(label: str, slug: str, init: str, args: tuple[str, ...], paper: dict[str, str] | None = None) -> Setting:
    return Setting(label, slug, "finetune", init, args, tuple((paper or {}).items()))


def _ev(label: str, slug: str, method: str, args: tuple[str, ...], paper: dict[str, str] | None = None) -> Setting:
    return Setting(label, slug, "evaluate", method, args, tuple((paper or {}).items()))


SHIN2021 = Recipe(
    name="shin2021",
    title="Shin et al. 2021, self-supervised transfer learning from natural images for sound classification",
    preset="shin2021",
    arch="resnet50",
    datasets=("gtzan", "esc50", "urbansound8k"),
    pretrain=(Pretrain("simclr", ("--epochs", "200", "--batch-size", "128")),),
    settings=(
        _ft("Table 1: ResNet-50 from scratch", "scratch", "scratch", SHIN_FINETUNE,
            {"gtzan": "86.50", "esc50": "78.25", "urbansound8k": "76.11"}),
        _ft("Table 1: ImageNet supervised init", "imagenet", "imagenet", SHIN_FINETUNE,
            {"gtzan": "90.50", "esc50": "90.55", "urbansound8k": "83.34"}),
        _ft("Table 1: SimCLR init (SimCLR's ImageNet weights)", "simclr-imagenet", "imagenet-simclr", SHIN_FINETUNE,
            {"gtzan": "90.50", "esc50": "90.15", "urbansound8k": "83.30"}),
        _ev("Table 2: SimCLR init, frozen linear", "simclr-imagenet-linear", "imagenet-simclr", LINEAR,
            {"gtzan": "77.00", "esc50": "63.40", "urbansound8k": "74.24"}),
        _ft("extra, not in the paper: SimCLR pretrained on the pooled audio", "simclr", "simclr", SHIN_FINETUNE),
        _ev("extra, not in the paper: SimCLR on the pooled audio, frozen linear", "simclr-linear", "simclr", LINEAR),
    ),
    notes=(
        "SimCLR init is SimCLR's released ImageNet ResNet-50, as in the paper (--simclr-weights FILE, or "
        "resnet50-1x.pth in the torch hub cache); the rows marked extra pretrain SimCLR on the pooled datasets' "
        "features instead, which the paper does not",
    ),
)

HORNAUER2021 = Recipe(
    name="hornauer2021",
    title="Hornauer et al. 2021, NPID pretraining over the environmental sound datasets combined",
    preset="hornauer2021",
    arch="esresnet50",  # "We use the best performing ESResNet with attention for all experiments"
    datasets=("esc10", "esc50", "urbansound8k", "dcase2013"),
    pretrain=(Pretrain("npid", ("--nce-k", "64", "--temperature", "0.4", "--epochs", "200", "--batch-size", "64")),),
    settings=(
        _ft("NPID init, all layers fine-tuned", "npid", "npid", SHIN_FINETUNE),
        # Fig. 4: "The average accuracy pretrained with DLS is on par with ImageNet pre-training
        # and significantly better than training from scratch"
        _ft("ImageNet init (ResNet-50 part; attention fresh)", "imagenet", "imagenet", SHIN_FINETUNE),
        _ft("from scratch (reference)", "scratch", "scratch", SHIN_FINETUNE),
    ),
    notes=(
        "the paper's numbers are not in DESIGN.md, so the table shows n/a for them",
        "fine-tuning uses audiofx's defaults (Shin/Palanisamy: Adam 1e-4, wd 1e-3, batch 32, 70 epochs)",
    ),
)

ZHOU2019 = Recipe(
    name="zhou2019",
    title="Zhou et al. 2019, VGG-16 as a fully convolutional network on TUT Urban Acoustic Scenes 2018 (subtask A)",
    preset="zhou2019",
    arch="vgg16",
    datasets=("tut2018",),
    pretrain=(),
    settings=(
        _ft("VGG-16, random init", "scratch", "scratch", SHIN_FINETUNE, {"tut2018": "61.9"}),
        _ft("VGG-16, ImageNet init", "imagenet", "imagenet", SHIN_FINETUNE, {"tut2018": "70.6"}),
        _ft("ImageNet init + 6 fragments", "imagenet-frag6", "imagenet", SHIN_FINETUNE + ("--fragments", "6"),
            {"tut2018": "73.9"}),
        _ft("ImageNet init + 6 fragments + left/right/mid fusion", "imagenet-frag6-fusion", "imagenet",
            SHIN_FINETUNE + ("--fragments", "6", "--channel-fusion"), {"tut2018": "75.5"}),
        _ft("ImageNet init + 6 fragments + fusion + MLP head", "imagenet-frag6-fusion-mlp", "imagenet",
            SHIN_FINETUNE + ("--fragments", "6", "--channel-fusion", "--head", "mlp-attn"), {"tut2018": "77.8"}),
    ),
    notes=(
        "fine-tuning hyperparameters are audiofx's defaults (Adam 1e-4, wd 1e-3, batch 32, 70 epochs); "
        "the official train/evaluate split is the one fold",
    ),
)

LIN2022 = Recipe(
    name="lin2022",
    title="Lin 2022, NPID and MoCo pretrained on FSD50K, transferred at 30 epochs",
    preset="shin2021",
    arch="resnet50",
    datasets=("esc50", "urbansound8k", "dcase2013", "gtzan"),
    pretrain=(
        Pretrain("npid", ("--nce-k", "64", "--temperature", "0.4", "--epochs", "200", "--batch-size", "64"),
                 pool=("fsd50k",)),
        Pretrain("moco", ("--temperature", "0.2", "--epochs", "200", "--batch-size", "128"), pool=("fsd50k",)),
    ),
    settings=(
        _ft("from scratch, fine-tuned", "scratch", "scratch", ("--fold", "all", "--epochs", "30"),
            {"gtzan": "36.9", "esc50": "42.3", "urbansound8k": "45.4"}),
        _ft("NPID fine-tune", "npid", "npid", ("--fold", "all", "--epochs", "30"),
            {"gtzan": "51.3", "esc50": "64.2", "urbansound8k": "65.2"}),
        _ft("MoCo fine-tune", "moco", "moco", ("--fold", "all", "--epochs", "30"),
            {"gtzan": "57.5", "esc50": "74.2", "urbansound8k": "73.0"}),
        _ft("ImageNet fine-tune", "imagenet", "imagenet", ("--fold", "all", "--epochs", "30"),
            {"gtzan": "62.5", "esc50": "69.6", "urbansound8k": "70.7"}),
        _ev("NPID frozen linear", "npid-linear", "npid", LINEAR),
        _ev("MoCo frozen linear", "moco-linear", "moco", LINEAR),
        _ev("NPID kNN", "npid-knn", "npid", KNN, {"gtzan": "47.3", "esc50": "36.9", "urbansound8k": "56.6"}),
        _ev("MoCo kNN", "moco-knn", "moco", KNN, {"gtzan": "51.3", "esc50": "46.8", "urbansound8k": "58.9"}),
    ),
    notes=(
        "Lin's frozen-linear numbers and all DCASE 2013 numbers are not in DESIGN.md: n/a",
        "the pretraining budgets (200 epochs; NPID batch 64, MoCo batch 128) and the shin2021 features are "
        "audiofx's choices, not taken from the paper",
    ),
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (SHIN2021, HORNAUER2021, ZHOU2019, LIN2022)}

# Folds of each dataset's default split (for the plan before anything is extracted; the
# store's manifest is used once it exists). Named splits (train/evaluate) are one test fold.
DEFAULT_FOLDS = {"esc50": 5, "esc10": 5, "urbansound8k": 10, "gtzan": 10, "dcase2013": 5, "tut2018": 1,
                 "tau2019": 1, "fsd50k": 1}

# A dataset whose clips are all in another's: a pretraining pool holding both takes them once
# (Hornauer et al.: "ESC-50, its subset ESC-10").
SUBSET_OF = {"esc10": "esc50"}

# Datasets `audiofx download NAME` fetches (ESC-10 comes with ESC-50).
DOWNLOAD_AS = {"esc50": "esc50", "esc10": "esc50", "urbansound8k": "urbansound8k", "gtzan": "gtzan",
               "fsd50k": "fsd50k", "tau2019": "tau2019"}
