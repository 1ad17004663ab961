"""Files: finding data files, atomic saves, Hugging Face checkpoints, Meta and llama2.c import."""
