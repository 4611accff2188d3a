"""Store -> tensors: which folds a stage reads (featuresets), the data mode (mode), in-memory
and streaming loaders (memory, streaming), input statistics (statistics), the pretraining
pool (pretrain_pool), and the one door the stages go through (inputs.open_inputs)."""
