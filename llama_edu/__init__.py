"""llama_edu: Llama 2 built from scratch in PyTorch, matching Hugging Face transformers."""

from .attention import LlamaAttention, repeat_kv
from .bpe import SentencePieceBPE, SentencePieceModel, merge_pair, train_bpe, train_sentencepiece
from .cache import Cache, DynamicCache, StaticCache
from .chat import chat, chat_loop
from .config import PRESETS, LlamaConfig
from .convert import convert_llama2c_checkpoint, convert_meta_checkpoint, load_llama2c, stories260k_hf
from .generation import generate
from .mlp import LlamaMLP
from .model import LlamaDecoder, LlamaDecoderLayer
from .modeling import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, LlamaPreTrainedModel
from .reference import reference_forward
from .rmsnorm import LlamaRMSNorm
from .rope import LlamaRotaryEmbedding, apply_rotary_pos_emb, rotate_half
from .streaming import TextIteratorStreamer, TextStreamer
from .tokenizer import DEFAULT_SYSTEM_PROMPT, BatchEncoding, LlamaTokenizer, LlamaTokenizerFast

__version__ = "0.1.0"

__all__ = [
    "Cache", "DynamicCache", "StaticCache", "LlamaConfig", "PRESETS", "LlamaAttention", "repeat_kv",
    "LlamaMLP", "LlamaRMSNorm", "LlamaRotaryEmbedding", "apply_rotary_pos_emb", "rotate_half",
    "LlamaDecoder", "LlamaDecoderLayer", "LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification",
    "LlamaPreTrainedModel", "LlamaTokenizer", "LlamaTokenizerFast", "BatchEncoding", "DEFAULT_SYSTEM_PROMPT",
    "convert_meta_checkpoint", "convert_llama2c_checkpoint", "load_llama2c", "stories260k_hf", "reference_forward",
    "generate", "chat", "chat_loop", "TextStreamer", "TextIteratorStreamer",
    "SentencePieceBPE", "SentencePieceModel", "merge_pair", "train_bpe", "train_sentencepiece",
]
