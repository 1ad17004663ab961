"""Text: the Llama 2 tokenizers (sentencepiece and fast), BPE from scratch, the chat template."""
