"""llama_edu: Llama 2 built from scratch in PyTorch, matching Hugging Face transformers.

The package has two rings. The core sits at the top: ``config``, ``rmsnorm``, ``rope``,
``attention``, ``mlp``, ``model``, ``cache`` and ``reference``, with ``modeling`` (transformers'
classes around it). The shell is in subpackages by concern: ``text``, ``io``, ``generation``,
``training``, ``quant``, ``course``, and ``cli``.

``from llama_edu import LlamaForCausalLM`` and the other public names load their module on first
use, so ``import llama_edu`` (and ``python -m llama_edu --help``) does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

__version__ = "0.1.0"

#: Public name -> the module that defines it (relative to this package).
_EXPORTS = {
    "LlamaConfig": "config", "PRESETS": "config",
    "LlamaRMSNorm": "rmsnorm",
    "LlamaRotaryEmbedding": "rope", "apply_rotary_pos_emb": "rope", "rotate_half": "rope",
    "LlamaAttention": "attention", "repeat_kv": "attention",
    "LlamaMLP": "mlp",
    "LlamaDecoder": "model", "LlamaDecoderLayer": "model",
    "Cache": "cache", "DynamicCache": "cache", "StaticCache": "cache",
    "reference_forward": "reference",
    "LlamaModel": "modeling", "LlamaForCausalLM": "modeling", "LlamaForSequenceClassification": "modeling",
    "LlamaPreTrainedModel": "modeling",
    "LlamaTokenizer": "text.tokenizer", "LlamaTokenizerFast": "text.tokenizer", "BatchEncoding": "text.tokenizer",
    "DEFAULT_SYSTEM_PROMPT": "text.tokenizer", "Llama3Tokenizer": "text.llama3",
    "SentencePieceBPE": "text.bpe", "SentencePieceModel": "text.bpe", "merge_pair": "text.bpe",
    "train_bpe": "text.bpe", "train_sentencepiece": "text.bpe",
    "convert_meta_checkpoint": "io.convert", "convert_llama2c_checkpoint": "io.convert",
    "load_llama2c": "io.convert", "stories260k_hf": "io.convert",
    "generate": "generation.decode",
    "chat": "generation.chat", "chat_loop": "generation.chat",
    "TextStreamer": "generation.streaming", "TextIteratorStreamer": "generation.streaming",
}

#: Modules that moved into subpackages: the old name -> where they live now. ``import
#: llama_edu.tokenizer`` and ``from llama_edu.exercises import check`` keep working.
MOVED_MODULES = {
    "tokenizer": "text.tokenizer", "bpe": "text.bpe",
    "files": "io.files", "atomic_save": "io.atomic_save", "checkpoint": "io.checkpoint", "convert": "io.convert",
    "sampling": "generation.sampling", "streaming": "generation.streaming", "chat": "generation.chat",
    "train": "training.train", "classification": "training.classification", "lora": "training.lora",
    "sft": "training.sft", "dpo": "training.dpo", "distributed": "training.distributed",
    "quantize": "quant.quantize", "gptq": "quant.gptq",
    "exercises": "course.exercises", "handout": "course.handout", "viz": "course.viz",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Load a public name's module on first use (PEP 562)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import llama_edu.<old name>`` with the module at its new place (the same
    object, so a monkeypatch through either name reaches both)."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package != __name__ or old not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED_MODULES[spec.name.rpartition('.')[2]]}")
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module):
        # The import system has stamped the alias's spec on the real module: give it its own back.
        module.__spec__ = self._own_spec


class _Package(types.ModuleType):
    """``llama_edu.chat`` is the function ``chat``; importing the old module name ``llama_edu.chat``
    must not replace it with the module (the import system sets a parent's attribute after a
    submodule import)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and name in MOVED_MODULES:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
