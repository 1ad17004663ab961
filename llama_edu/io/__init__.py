"""Files in and out: finding data, atomic saves, HF checkpoints, Meta / llama2.c import, GGUF export."""
