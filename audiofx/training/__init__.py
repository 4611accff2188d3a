"""Store -> results, in rooms: data/ (what a stage reads, in memory or streamed), models/
(encoders, augmentation, self-supervised methods), stages/ (pretrain, finetune, evaluate),
report/ (tables and figures), runtime/ (device, ranks). docs/architecture.md draws them."""
