"""Self-supervised pre-training on the single-camera shards (``dynamix pretrain``), on Ray Train."""
