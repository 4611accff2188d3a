# Every target creates .venv on first use, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The whole chain on the synthetic demo dataset, offline on CPU in a few minutes: extract,
# NPID pretraining of a small CNN, fine-tuning from scratch and from NPID over all 5 folds,
# weighted kNN on the frozen NPID encoder and on the same CNN at random init (the baseline),
# a table comparing the four, and a report with figures (data/runs/demo/report/report.md).
# NPID uses its exact softmax (--nce-k 0): with 200 clips, NCE's 64 noise samples are a third
# of the set, far from the K << N it approximates the softmax in (measured: NCE's loss rises
# and its kNN ends below random init; docs/architecture.md).
DEMO_RUNS := data/runs/demo
DEMO_TRAIN := --arch tiny --no-progress --runs $(DEMO_RUNS)
DEMO_COMPARED := $(addprefix $(DEMO_RUNS)/,finetune/scratch finetune/npid-finetune evaluate/npid-knn evaluate/random-knn)

demo: $(STAMP)
	$(BIN)/audiofx extract --dataset demo
	$(BIN)/audiofx cache ls
	rm -rf $(DEMO_RUNS)
	$(BIN)/audiofx pretrain --method npid --nce-k 0 --datasets demo --epochs 10 --batch-size 32 --name npid $(DEMO_TRAIN)
	$(BIN)/audiofx finetune --dataset demo --init scratch --epochs 6 --lr 1e-3 --name scratch $(DEMO_TRAIN)
	$(BIN)/audiofx finetune --dataset demo --init npid --epochs 6 --lr 1e-3 --name npid-finetune --no-progress --runs $(DEMO_RUNS)
	$(BIN)/audiofx evaluate --run npid --dataset demo --mode knn --name npid-knn --runs $(DEMO_RUNS)
	$(BIN)/audiofx evaluate --run random --arch tiny --dataset demo --mode knn --name random-knn --runs $(DEMO_RUNS)
	$(BIN)/audiofx compare $(DEMO_COMPARED)
	$(BIN)/audiofx report $(DEMO_COMPARED) --out $(DEMO_RUNS)/report

# The 20 slowest tests are printed at the end, so that their cost stays in view.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests --durations=20

bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/remote.py

clean-venv:
	rm -rf $(VENV)
