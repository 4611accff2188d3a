"""Store -> results: data loading, models, self-supervised pretraining, fine-tuning and frozen
evaluation, run folders."""
