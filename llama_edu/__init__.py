"""llama_edu: Llama 2 built from scratch in PyTorch, matching Hugging Face transformers."""

from .attention import LlamaAttention, repeat_kv
from .cache import Cache, DynamicCache, StaticCache
from .config import PRESETS, LlamaConfig
from .convert import convert_llama2c_checkpoint, convert_meta_checkpoint, load_llama2c
from .generation import TextIteratorStreamer, TextStreamer, chat, generate
from .mlp import LlamaMLP
from .model import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    LlamaPreTrainedModel,
)
from .rmsnorm import LlamaRMSNorm
from .bpe import SentencePieceBPE, SentencePieceModel, merge_pair, train_bpe, train_sentencepiece
from .tokenizer import DEFAULT_SYSTEM_PROMPT, BatchEncoding, LlamaTokenizer, LlamaTokenizerFast
from .rope import LlamaRotaryEmbedding, apply_rotary_pos_emb, rotate_half

__version__ = "0.1.0"

__all__ = [
    "Cache", "DynamicCache", "StaticCache", "LlamaConfig", "PRESETS", "LlamaAttention", "repeat_kv",
    "LlamaMLP", "LlamaRMSNorm", "LlamaRotaryEmbedding", "apply_rotary_pos_emb", "rotate_half",
    "LlamaDecoderLayer", "LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification",
    "LlamaPreTrainedModel", "LlamaTokenizer", "LlamaTokenizerFast", "BatchEncoding", "DEFAULT_SYSTEM_PROMPT",
    "convert_meta_checkpoint", "convert_llama2c_checkpoint", "load_llama2c", "generate", "chat", "TextStreamer", "TextIteratorStreamer",
    "SentencePieceBPE", "SentencePieceModel", "merge_pair", "train_bpe", "train_sentencepiece",
]
