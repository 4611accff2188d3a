# Every target creates .venv on first use, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench gpu-wheels gpu-check clean-venv

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

# The GPU check (benchmarks/gpu_check.py) on a CUDA machine that cannot reach a package index
# but has torch, torchvision, torchaudio, numpy, scipy, scikit-learn, numba and matplotlib:
#   here:  make gpu-wheels     wheels of the rest, at this venv's versions, into .whl/ (ignored)
#   there: make gpu-check      a venv over the machine's own packages, the wheels installed
#                              offline, audiofx put on the path, then the check; GPU_CHECK_ARGS
#                              are passed on (e.g. GPU_CHECK_ARGS='--out $$OUT').
GPU_WHEELS := .whl
GPU_MISSING := audioread cffi dask decorator donfig google-crc32c librosa locket numcodecs partd \
	platformdirs pooch pycparser soundfile soxr zarr
GPU_PLATFORMS := $(addprefix --platform ,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64)
GPU_CHECK_ARGS ?=

gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d $(GPU_WHEELS) $$($(BIN)/python -c "import importlib.metadata as m; \
		print(' '.join(f'{n}=={m.version(n)}' for n in '$(GPU_MISSING)'.split()))")
	ls $(GPU_WHEELS)

gpu-check:
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install --quiet --no-index --no-deps --no-compile $(GPU_WHEELS)/*.whl
	$(BIN)/python -c "import sysconfig, pathlib; \
		pathlib.Path(sysconfig.get_paths()['purelib'], 'audiofx-src.pth').write_text('$(CURDIR)\n')"
	$(BIN)/python -c "import audiofx.cli, audiofx.pipeline.extract, audiofx.training.stages.pretrain, torchvision, torchaudio"
	PYTHONUNBUFFERED=1 $(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
