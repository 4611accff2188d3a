"""The papers' recipes as data: which features and protocols, which pretraining, which
fine-tuning and evaluation runs, every number each paper reports and the metric it reports it
with (the papers' text in ../shared/papers decides; docs/recipes.md quotes it). `audiofx
reproduce` (audiofx/reproduce.py) turns a recipe into `audiofx ...` commands; nothing here
imports torch.

A recipe's stages are argument lists of the real CLI commands. What the runner adds to them
is only plumbing: --dataset/--preset/--arch, a dataset's protocol (--set), the run name,
--store/--runs/--device, --weights / --simclr-weights for the ImageNet inits, --no-progress
and --resume.

Each recipe says, apart, its ``choices`` (where the paper is silent or reads two ways: the value
audiofx takes and why) and its ``differences`` (what cannot be done from a feature cache
offline); --dry-run and the table print both.
"""

from __future__ import annotations

from dataclasses import dataclass

# Shin/Palanisamy fine-tuning: finetune's defaults, spelled out so the command says them.
SHIN_FINETUNE = ("--fold", "all", "--epochs", "70", "--batch-size", "32", "--lr", "1e-4", "--weight-decay", "1e-3")
# Shin et al.'s linear evaluation: "we froze the encoder ... and only fine-tuned the single
# fully-connected (FC) layer", trained as everything else in the paper (Adam 1e-4, wd 1e-3, 70 epochs).
LINEAR = ("--mode", "linear", "--fold", "all", "--probe", "sgd", "--epochs", "70", "--lr", "1e-4", "--weight-decay",
          "1e-3")

# How a cell reads a run (reproduce.py): the headline (finetune: last epoch; evaluate: its
# score), the test score at the epoch the fold-averaged validation curve selects ("curve":
# Lin's "best average validation accuracy", selected on a split held out of the training
# folds), kNN with k chosen by cross-validation on the training folds ("kcv"), or the
# fold-averaged test score at one epoch of the curve ("epoch": Hornauer et al.'s Fig. 4).
METRICS = ("last", "curve", "kcv", "epoch")


@dataclass(frozen=True)
class Pretrain:
    """One self-supervised pretraining run over a pool of datasets, or one per dataset."""

    method: str  # npid | simclr | moco
    args: tuple[str, ...]  # pretrain options besides --method/--datasets/--arch/--preset
    pool: tuple[str, ...] = ()  # () = the recipe's (selected) datasets, pooled
    label: str = ""  # what settings call it ("" = the method)
    per_dataset: bool = False  # one run on each dataset alone (Hornauer et al.'s phase 1)

    @property
    def ref(self) -> str:
        return self.label or self.method


@dataclass(frozen=True)
class Setting:
    """One row of the paper's table: a finetune or evaluate run on each dataset, or a number
    the paper quotes from elsewhere (stage "quoted": shown, not run)."""

    label: str  # the row as the table shows it
    slug: str  # the run-name part: <recipe>-<dataset>-<slug>; rows with one slug share the run
    stage: str  # finetune | evaluate | quoted
    source: str  # finetune: its --init; evaluate: its --run (a Pretrain's ref for pretrained ones)
    args: tuple[str, ...]  # the stage's other options (epochs, mode, ...)
    paper: tuple[tuple[str, str], ...] = ()  # (dataset, the paper's number as printed, in %)
    arch: str | None = None  # another backbone than the recipe's (Zhou et al.'s AlexNet, ResNet)
    per_dataset: tuple[tuple[str, tuple[str, ...]], ...] = ()  # options for one dataset only (Lin's K)
    metric: str = "last"  # METRICS
    at_epoch: tuple[tuple[str, int], ...] = ()  # metric "epoch": the epoch read on each dataset

    def __post_init__(self) -> None:
        if self.metric not in METRICS:  # a recipe's typo, caught when recipes.py is imported
            raise ValueError(f"setting {self.label!r}: metric {self.metric!r} is not one of {', '.join(METRICS)}")

    def paper_number(self, dataset: str) -> str | None:
        return dict(self.paper).get(dataset)

    def args_for(self, dataset: str) -> tuple[str, ...]:
        return self.args + dict(self.per_dataset).get(dataset, ())

    def epoch_for(self, dataset: str) -> int | None:
        return dict(self.at_epoch).get(dataset)


@dataclass(frozen=True)
class ClassTable:
    """A paper's per-class table of one test fold: each setting's F1 per class, compared with
    ours from the saved predictions of that fold (Lin 2022's Table 3.3)."""

    title: str
    dataset: str
    fold: str
    f1: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # (setting slug, ((class, F1 as printed), ...))
    note: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str  # the paper
    preset: str  # feature preset for extract and for every training stage
    arch: str  # backbone (--arch overrides it)
    datasets: tuple[str, ...]  # the table's columns
    pretrain: tuple[Pretrain, ...]
    settings: tuple[Setting, ...]
    # A dataset's protocol as --set values: given to extract, and to every stage that reads it.
    protocols: tuple[tuple[str, tuple[str, ...]], ...] = ()
    choices: tuple[str, ...] = ()  # where the paper is silent or ambiguous: audiofx's value, and why
    differences: tuple[str, ...] = ()  # what cannot be done from a feature cache offline
    class_tables: tuple[ClassTable, ...] = ()

    def protocol(self, dataset: str) -> tuple[str, ...]:
        return dict(self.protocols).get(dataset, ())


def _ft(label: str, slug: str, init: str, args: tuple[str, ...], paper: dict[str, str] | None = None,
        **kw) -> Setting:
    return Setting(label, slug, "finetune", init, args, tuple((paper or {}).items()), **kw)


def _ev(label: str, slug: str, method: str, args: tuple[str, ...], paper: dict[str, str] | None = None,
        **kw) -> Setting:
    return Setting(label, slug, "evaluate", method, args, tuple((paper or {}).items()), **kw)


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
    protocols=(("gtzan", ("ratios=80/0/20",)), ("urbansound8k", ("fit=resize",))),
    choices=(
        "folds: the paper's 'k = 1 for GTZAN, 10 for ESC-50, and 5 for UrbanSound8K' with 'the predefined "
        "training/validation folds' reads as swapped: ESC-50's predefined folds are 5 and UrbanSound8K's 10, which "
        "audiofx uses; GTZAN's one split is 80/20 train/test, stratified and seeded (its numbers are multiples of "
        "0.5%, a 200-clip test split)",
        "UrbanSound8K: 'we fixed their length to 4 s by resizing': each clip's log-mel is resized to 250 frames, "
        "not zero-padded (--set fit=resize)",
        "schedule: the paper states none but uses 'the same settings as a previous study [14]', whose code decays "
        "the rate x0.1 every 30 epochs (finetune's default)",
        "headline: the paper does not say best or last epoch; the cell is the last epoch (best-epoch scores, "
        "selected on the test fold as [14]'s code keeps them, are in each run's summary)",
        "Table 2's probe: 'only fine-tuned the single fully-connected (FC) layer' with no recipe of its own; the "
        "paper's training settings (Adam 1e-4, wd 1e-3, 70 epochs) on the frozen encoder's features, standardised "
        "(evaluate --probe sgd)",
    ),
)

HORNAUER2021 = Recipe(
    name="hornauer2021",
    title="Hornauer et al. 2021, unsupervised discriminative learning of sounds (DLS): NPID on the datasets combined",
    preset="hornauer2021",
    arch="esresnet50",  # "We use the best performing ESResNet with attention for all experiments"
    datasets=("esc10", "esc50", "urbansound8k", "dcase2013"),
    pretrain=(
        # Phase 1: "trained and evaluated on each dataset separately, according to the official
        # training/evaluation folds" ... "weighted K=5 nearest neighbors"; Table 1: tuned on fold 1.
        Pretrain("npid", ("--hold-out-fold", "1", "--nce-k", "64", "--temperature", "0.4", "--epochs", "200",
                          "--batch-size", "64"), label="phase1-npid", per_dataset=True),
        # Phase 2: "all available audio datasets and folds ... one large training dataset".
        Pretrain("npid", ("--nce-k", "64", "--temperature", "0.4", "--epochs", "200", "--batch-size", "64")),
    ),
    settings=(
        _ev("phase 1: NPID on the dataset alone, weighted 5-NN on fold 1 (the paper reports no number)",
            "phase1-knn", "phase1-npid", ("--mode", "knn", "--fold", "1", "--k", "5")),
        # Fig. 4: "The average accuracy pretrained with DLS is on par with ImageNet pre-training
        # and significantly better than training from scratch"; the numbers are the text's readings.
        _ft("Fig. 4: DLS (NPID on the pool), all layers fine-tuned", "npid", "npid", SHIN_FINETUNE,
            {"esc10": "≈80", "dcase2013": "≈50", "esc50": ">60"}, metric="epoch",
            at_epoch=(("esc10", 3), ("dcase2013", 11), ("esc50", 15))),
        _ft("Fig. 4: ImageNet init (ResNet-50 part; attention fresh)", "imagenet", "imagenet", SHIN_FINETUNE,
            metric="epoch", at_epoch=(("esc10", 3), ("dcase2013", 11), ("esc50", 15))),
        _ft("Fig. 4: from scratch", "scratch", "scratch", SHIN_FINETUNE, {"esc10": "<40"}, metric="epoch",
            at_epoch=(("esc10", 3), ("dcase2013", 11), ("esc50", 15))),
    ),
    protocols=(("dcase2013", ("folds=2",)),),
    choices=(
        "the paper's results are Fig. 4's accuracy-over-epochs curves (mean ± std over folds), drawn by the report; "
        "the table reads ours at the epochs the text quotes: ESC-10 'rising to 80% accuracy' within three epochs "
        "where 'training from scratch remains under 40%', DCASE 2013 'rising towards 50%' over 11 epochs, ESC-50 "
        "'over 60% accuracy in the first 15 epochs'; UrbanSound8K has no number",
        "fine-tuning: the paper gives no optimiser, rate or epochs; audiofx's defaults (Adam 1e-4, wd 1e-3, "
        "batch 32, 70 epochs; the text reads curves up to epoch 30)",
        "phase 1 scores fold 1 ('We tune hyperparameters on one fold', Table 1) after pretraining on the other "
        "folds; the paper prints no phase-1 number",
        "pool: 'ESC-50, its subset ESC-10' hold the same clips; each is pretrained on once",
    ),
)

ZHOU_ONE = SHIN_FINETUNE + ("--input-channel", "mid")  # "The system uses only the average channel"

ZHOU2019 = Recipe(
    name="zhou2019",
    title="Zhou et al. 2019, transfer learning for acoustic scene classification on TUT Urban Acoustic Scenes 2018",
    preset="zhou2019",
    arch="vgg16",
    datasets=("tut2018",),
    pretrain=(),
    settings=(
        _ft("Table 1: AlexNet, random init", "alexnet-scratch", "scratch", ZHOU_ONE, {"tut2018": "59.5"}, arch="alexnet"),
        _ft("Table 1: AlexNet, ImageNet init", "alexnet-imagenet", "imagenet", ZHOU_ONE, {"tut2018": "64.3"},
            arch="alexnet"),
        _ft("Table 1: VGG-16, random init", "scratch", "scratch", ZHOU_ONE, {"tut2018": "61.9"}),
        _ft("Table 1: VGG-16, ImageNet init", "imagenet", "imagenet", ZHOU_ONE, {"tut2018": "70.6"}),
        _ft("Table 1: ResNet-50, random init", "resnet50-scratch", "scratch", ZHOU_ONE, {"tut2018": "61.6"},
            arch="resnet50"),
        _ft("Table 1: ResNet-50, ImageNet init", "resnet50-imagenet", "imagenet", ZHOU_ONE, {"tut2018": "70.2"},
            arch="resnet50"),
        *(_ft(f"Table 2: VGG-16, ImageNet init, {n} fragments", f"imagenet-frag{n}", "imagenet",
              ZHOU_ONE + ("--fragments", str(n)), {"tut2018": acc})
          for n, acc in ((3, "71.6"), (6, "73.9"), (9, "71.8"), (12, "71.8"))),
        Setting("Table 3: DCASE 2018 baseline [26] (quoted by the paper, not run)", "baseline", "quoted", "", (),
                (("tut2018", "59.7"),)),
        _ft("Table 3: average channel, VGG-16, 6 fragments (Table 2's run)", "imagenet-frag6", "imagenet",
            ZHOU_ONE + ("--fragments", "6"), {"tut2018": "73.9"}),
        _ft("Table 3: left, right, average, VGG-16, 6 fragments", "imagenet-frag6-fusion", "imagenet",
            SHIN_FINETUNE + ("--fragments", "6", "--channel-fusion"), {"tut2018": "75.5"}),
        _ft("Table 3: left, right, average, VGG-16 + MLP, 6 fragments", "imagenet-frag6-fusion-mlp", "imagenet",
            SHIN_FINETUNE + ("--fragments", "6", "--channel-fusion", "--head", "mlp-attn"), {"tut2018": "77.8"}),
    ),
    choices=(
        "training: the paper gives no optimiser, rate, schedule, epochs or batch size; audiofx's defaults (Adam "
        "1e-4, wd 1e-3, step x0.1 every 30 epochs, batch 32, 70 epochs)",
        "one channel into an ImageNet network: the paper does not say how; the channel is repeated on the 3 inputs",
        "fragments: equal, non-overlapping pieces of the clip (the remainder frames dropped), the same number at "
        "test, posteriors averaged per clip (the paper gives no length or overlap)",
        "Table 1's 'ResNet' is ResNet-50 (the conclusions name it); the one split is the development set's official "
        "train/evaluate split, so the ± std is 0",
    ),
    differences=(
        "Table 3's baseline (59.7) is the DCASE 2018 challenge's published baseline system [26] (two convolutional "
        "layers on 40 log-mel bands), which the paper quotes and does not run; audiofx shows it without a run",
    ),
)

US8K_CLASSES = ("air_conditioner", "car_horn", "children_playing", "dog_bark", "drilling", "engine_idling",
                "gun_shot", "jackhammer", "siren", "street_music")


def _us8k(values: str) -> tuple[tuple[str, str], ...]:
    """A row of F1 per UrbanSound8K class, in the classes' order, as printed."""
    return tuple(zip(US8K_CLASSES, values.split(), strict=True))


LIN_FINETUNE = ("--fold", "all", "--epochs", "30", "--val-split", "0.15")
LIN_K = (("esc50", ("--k", "35,200")), ("urbansound8k", ("--k", "200")), ("dcase2013", ("--k", "18,200")),
         ("gtzan", ("--k", "35,200")))

LIN_MASKS = ("--time-masks", "1", "--freq-masks", "1")  # "a frequency and time mask from Park et al." (L531)

LIN2022 = Recipe(
    name="lin2022",
    title="Lin 2022, contrastive feature learning for audio classification: NPID and MoCo on FSD50K, transferred",
    preset="lin2022",
    arch="resnet50",
    datasets=("esc50", "urbansound8k", "dcase2013", "gtzan"),
    pretrain=(
        Pretrain("npid", ("--nce-k", "64", "--temperature", "0.4", "--epochs", "200", "--batch-size", "64",
                          *LIN_MASKS), pool=("fsd50k",)),
        Pretrain("moco", ("--temperature", "0.2", "--epochs", "200", "--batch-size", "128", *LIN_MASKS),
                 pool=("fsd50k",)),
    ),
    settings=(
        # Tables 3.1, 3.2, 3.4, 3.5: "Best Average Validation Accuracies" (GTZAN: "Test Accuracies").
        _ft("Scratch, fine-tuned", "scratch", "scratch", LIN_FINETUNE,
            {"esc50": "42.3", "urbansound8k": "45.4", "dcase2013": "45.0", "gtzan": "36.9"}, metric="curve"),
        _ft("NPID Fine Tune", "npid", "npid", LIN_FINETUNE,
            {"esc50": "64.2", "urbansound8k": "65.2", "dcase2013": "72.0", "gtzan": "51.3"}, metric="curve"),
        _ft("MoCo Fine Tune", "moco", "moco", LIN_FINETUNE,
            {"esc50": "74.2", "urbansound8k": "73.0", "dcase2013": "79.5", "gtzan": "57.5"}, metric="curve"),
        _ft("Imagenet Fine Tune", "imagenet", "imagenet", LIN_FINETUNE,
            {"esc50": "69.6", "urbansound8k": "70.7", "dcase2013": "71.0", "gtzan": "62.5"}, metric="curve"),
        _ev("NPID Freeze (frozen linear)", "npid-linear", "npid", ("--mode", "linear", "--fold", "all"),
            {"esc50": "49.3", "urbansound8k": "55.0", "dcase2013": "65.0", "gtzan": "42.5"}),
        _ev("MoCo Freeze (frozen linear)", "moco-linear", "moco", ("--mode", "linear", "--fold", "all"),
            {"esc50": "59.5", "urbansound8k": "63.1", "dcase2013": "68.5", "gtzan": "53.8"}),
        _ev("NPID KNN (k by cross-validation)", "npid-knn", "npid", ("--mode", "knn", "--fold", "all"),
            {"esc50": "36.9", "urbansound8k": "56.6", "dcase2013": "72.5", "gtzan": "47.3"}, per_dataset=LIN_K,
            metric="kcv"),
        _ev("MoCo KNN (k by cross-validation)", "moco-knn", "moco", ("--mode", "knn", "--fold", "all"),
            {"esc50": "46.8", "urbansound8k": "58.9", "dcase2013": "83.0", "gtzan": "51.3"}, per_dataset=LIN_K,
            metric="kcv"),
    ),
    # FSD50K is stored with 3 augmented copies of each clip, which the pretraining views draw from.
    protocols=(("dcase2013", ("folds=2",)), ("gtzan", ("ratios=70/15/15",)), ("fsd50k", ("augment_copies=3",))),
    class_tables=(ClassTable(
        "Table 3.3: F1 per class on UrbanSound8K fold 1", "urbansound8k", "1", (
            ("moco", _us8k("0.694 0.825 0.809 0.881 0.535 0.643 0.971 0.723 0.809 0.772")),
            ("moco-linear", _us8k("0.545 0.200 0.606 0.727 0.519 0.360 0.515 0.606 0.679 0.659")),
            ("moco-knn", _us8k("0.284 0.667 0.667 0.818 0.517 0.429 0.943 0.588 0.718 0.745")),
            ("npid", _us8k("0.658 0.824 0.753 0.745 0.538 0.507 0.895 0.585 0.813 0.763")),
            ("npid-linear", _us8k("0.396 0.052 0.478 0.657 0.560 0.288 0.615 0.706 0.641 0.519")),
            ("npid-knn", _us8k("0.515 0.311 0.673 0.699 0.485 0.573 0.636 0.628 0.716 0.602")),
            ("imagenet", _us8k("0.490 0.917 0.802 0.772 0.751 0.566 0.957 0.872 0.869 0.832")),
            ("scratch", _us8k("0.271 0.517 0.517 0.597 0.544 0.500 0.642 0.294 0.535 0.165"))),
        note="the thesis prints Scratch's Car Horn row (0.608 / 0.450 / 0.517) as its Children Playing row; a recall "
             "of 0.450 cannot be had from fold 1's 36 car horns, so that cell is a copy error"),),
    choices=(
        "waveform augmentation: 'augment it through random flipping, padding, cropping, and pitch shifting' before "
        "the mel, with no parameters: extract stores 3 augmented copies of each FSD50K clip beside it (--set "
        "augment_copies=3: a time reversal with probability 0.5, an offset of up to a quarter of the clip padded "
        "with zeros and cropped, a pitch shift of up to 2 semitones, each seeded by the clip's path) and each "
        "pretraining view is one of the 4, then masked on the log-mel with one frequency and one time mask ('a "
        "frequency and time mask from Park et al.'; audiofx's default is two of each)",
        "metric: 'best average validation accuracy' is the best epoch of the fold-averaged curve of the held-out "
        "folds, which are the test folds; audiofx selects that epoch on 15% of each test fold's training folds held "
        "out (--val-split 0.15, never trained on) and reports the test folds there, beside the last epoch; GTZAN "
        "selects on its 15% validation split and reports its test split ('Test Accuracies')",
        "kNN: 'K-values ... were chosen through cross validation': the cell is k chosen on the training folds; the "
        "paper's K (35, 200, 18, 35) and 200 are in each run",
        "kNN space: the memory bank is 'repopulated with the training features' of the pretrained network, NPID's "
        "128-d embedding (evaluate's default for a pretrain run)",
        "frozen linear: 'only train the classifier' for up to 30 epochs with no recipe given; audiofx fits it to "
        "its optimum (lbfgs, the penalty cross-validated on the training folds)",
        "pretraining: 'I reused most of the base parameters' without listing them; NPID at Hornauer et al.'s "
        "values (K 64, temperature 0.4, batch 64), whose experiments Lin expands on; MoCo v2's temperature 0.2, "
        "batch 128; 200 epochs ('starts to converge around epoch 120')",
        "features: one log-mel (ESResNet's STFT at 44.1 kHz, 128 mel bands; Lin states no mel settings) repeated "
        "on the 3 input channels; ResNet-50 ('The base ESResNet model follows the vanilla ResNet50')",
    ),
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (SHIN2021, HORNAUER2021, ZHOU2019, LIN2022)}

# Folds of each dataset's default split (for the plan before anything is extracted; the
# store's manifest is used once it exists). Named splits (train/evaluate) are one test fold.
DEFAULT_FOLDS = {"esc50": 5, "esc10": 5, "urbansound8k": 10, "gtzan": 10, "dcase2013": 5, "tut2018": 1,
                 "tau2019": 1, "fsd50k": 1}

# Datasets `audiofx download NAME` fetches (ESC-10 comes with ESC-50).
DOWNLOAD_AS = {"esc50": "esc50", "esc10": "esc50", "urbansound8k": "urbansound8k", "gtzan": "gtzan",
               "fsd50k": "fsd50k", "tau2019": "tau2019"}
