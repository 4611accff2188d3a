"""The three training stages (pretrain.py, finetune.py, evaluate.py) and what only they use:
the epoch loop (epochs.py), run folders (runs.py), starting weights (weights.py), tasks and
metrics, kNN, Zhou et al.'s fusion, frozen forward passes (embedding.py)."""
