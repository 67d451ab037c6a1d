"""The train stage: Ray Train DDP LoRA fine-tuning, adapter-only checkpoints and resume."""
