"""Training: the one loop (loop.py), and pretraining, classification, LoRA, SFT and DPO as the losses and data it runs."""
