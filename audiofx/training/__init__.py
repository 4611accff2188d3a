"""Store -> results: data loading, models, self-supervised and supervised loops (later issues)."""
