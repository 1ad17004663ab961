"""Training: the one training loop, and the objectives it runs (pretraining, classification, LoRA, SFT, DPO), distributed."""
