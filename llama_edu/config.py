"""LlamaConfig: every hyper-parameter of a Llama model, as Hugging Face's ``config.json`` names it.

The fields and defaults are those of ``transformers.LlamaConfig`` (v4.37 documentation), so a
real ``config.json`` from the hub loads with ``LlamaConfig(**json.load(f))`` and a config saved
here loads in transformers. Values that cannot work raise a ``ValueError`` naming the field and
the fix, at construction time rather than deep inside a forward pass.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

from .io.files import atomic_write_bytes, read_json_object, resolve_file

#: The transformers release whose config.json format we write (and test against).
TRANSFORMERS_VERSION = "4.37.2"

ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3")
#: The extra fields of Llama 3.1's "llama3" scaling (see rope.llama3_inv_freq).
LLAMA3_ROPE_FIELDS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rope_from_newer_releases(rope_theta: Any, rope_scaling: Any, kwargs: dict) -> tuple[Any, Any]:
    """The RoPE settings of any transformers release in the 4.37 form this package reads
    (``rope_theta`` and ``rope_scaling={"type", "factor"}``).

    - 4.43+ names the scaling kind ``rope_type`` (and writes ``type`` too, when it was given),
      and ``{"rope_type": "default"}`` means no scaling;
    - 5.x moves both into ``rope_parameters={"rope_type", "rope_theta", ...}``.
    """
    params = kwargs.pop("rope_parameters", None)
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"rope_parameters must be a dict like {{'rope_type': 'default', 'rope_theta': 10000.0}}, got {params!r}")
        params = dict(params)
        if "rope_theta" in params:
            rope_theta = params.pop("rope_theta")
        if rope_scaling is None:
            rope_scaling = params
    if isinstance(rope_scaling, dict) and "rope_type" in rope_scaling:
        rs = dict(rope_scaling)
        kind = rs.pop("rope_type")
        if "type" in rs and rs["type"] != kind:
            raise ValueError(f"rope_scaling has type={rs['type']!r} but rope_type={kind!r}; keep one of them")
        rs["type"] = kind
        rope_scaling = None if kind == "default" and set(rs) == {"type"} else rs
    return rope_theta, rope_scaling


class LlamaConfig:
    """The configuration of a Llama model. Defaults describe Llama 2 7B with a 2048 context,
    exactly as transformers' ``LlamaConfig()`` does; see :data:`PRESETS` for the real shapes.

    Unknown keyword arguments are kept as attributes (and written back by :meth:`to_dict`),
    as transformers does, so nothing in a ``config.json`` is lost in a round trip.
    """

    model_type = "llama"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        pretraining_tp: int = 1,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        attn_implementation: str | None = None,
        **kwargs: Any,
    ):
        rope_theta, rope_scaling = _rope_from_newer_releases(rope_theta, rope_scaling, kwargs)
        head_dim = kwargs.pop("head_dim", None)  # transformers >= 4.45 writes it; here it is derived
        if "dtype" in kwargs:  # transformers >= 4.56 writes "dtype" where older ones wrote "torch_dtype"
            kwargs.setdefault("torch_dtype", kwargs.pop("dtype"))
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # None means multi-head attention: one key/value head per query head.
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pretraining_tp = pretraining_tp
        self.tie_word_embeddings = tie_word_embeddings
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout

        # Generic fields every transformers config has; the heads and forward() read them.
        num_labels = kwargs.pop("num_labels", None)
        id2label = kwargs.pop("id2label", None) or {}
        try:
            self.id2label = {int(k): v for k, v in id2label.items()}
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"id2label must map class ids to names, like {{'0': 'ham', '1': 'spam'}}; got {id2label!r}") from None
        self.label2id = dict(kwargs.pop("label2id", None) or {})
        if num_labels is not None and (num_labels != len(self.id2label) or not self.id2label):
            self.num_labels = num_labels
        elif not self.id2label:
            self.num_labels = 2
        self.problem_type = kwargs.pop("problem_type", None)
        self.output_attentions = kwargs.pop("output_attentions", False)
        self.output_hidden_states = kwargs.pop("output_hidden_states", False)
        self.return_dict = kwargs.pop("return_dict", True)
        self.torch_dtype = kwargs.pop("torch_dtype", None)
        self.architectures = kwargs.pop("architectures", None)
        kwargs.pop("model_type", None)
        kwargs.pop("_attn_implementation", None)
        for key, value in kwargs.items():  # keep what we do not know, as transformers does
            prop = getattr(type(self), key, None)
            if isinstance(prop, property) and prop.fset is None:
                continue  # a value derived from the others (use_return_dict): nothing to keep
            setattr(self, key, value)

        self._attn_implementation = attn_implementation or "sdpa"
        self.validate()
        if head_dim is not None:
            self.head_dim = head_dim  # checked against hidden_size / num_attention_heads

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        """Size of one attention head: hidden_size / num_attention_heads (128 for every Llama 2)."""
        return self.hidden_size // self.num_attention_heads

    @head_dim.setter
    def head_dim(self, value: int) -> None:
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == self.head_dim):
            return
        raise ValueError(
            f"head_dim ({value!r}) must equal hidden_size / num_attention_heads = {self.hidden_size} / "
            f"{self.num_attention_heads} = {self.head_dim}: this Llama 2 architecture ties them (transformers >= 4.45 "
            "allows a separate head_dim, which llama_edu does not support). Remove head_dim from the config or "
            "change hidden_size / num_attention_heads to match"
        )

    @property
    def num_labels(self) -> int:
        """Number of classes of the sequence-classification head (from ``id2label``)."""
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_labels must be a positive int, got {n!r}")
        if len(self.id2label) != n:
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    @property
    def attn_implementation(self) -> str:
        """Which attention kernel the model uses: "sdpa" (default), "eager" or "flash_attention_2"."""
        return self._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        self._attn_implementation = value
        self._validate_attn_implementation()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix when a value cannot work."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                     "pretraining_tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}; fix it in config.json")
        for name, example in (("rms_norm_eps", "1e-5"), ("rope_theta", "10000.0"), ("initializer_range", "0.02")):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0 (e.g. {example}), got {value!r}; fix it in config.json")
        value = self.attention_dropout
        if not _is_number(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"attention_dropout must be a number in [0, 1), got {value!r}; Llama uses 0.0")
        for name in ("use_cache", "tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r} (a JSON boolean, not a string)")
        if getattr(self, "mlp_bias", False) is not False:
            raise ValueError(
                f"mlp_bias={getattr(self, 'mlp_bias')!r} is not supported: Llama's feed-forward layers have no bias "
                "(transformers >= 4.41 allows one for other models); remove mlp_bias or set it to false"
            )
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            if not all(i is None or (isinstance(i, int) and not isinstance(i, bool) and i >= 0) for i in ids):
                raise ValueError(f"{name} must be a token id (an int >= 0), a list of them, or null; got {value!r}")
        if self.pad_token_id is not None and (not isinstance(self.pad_token_id, int) or isinstance(self.pad_token_id, bool)):
            raise ValueError(f"pad_token_id must be an int token id or null, got {self.pad_token_id!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {ACTIVATIONS} (Llama uses 'silu')")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); choose a hidden_size that is a multiple of the head "
                f"count, e.g. {self.num_attention_heads * max(1, self.hidden_size // self.num_attention_heads)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads}): each key/value head serves a whole "
                "group of query heads. Use a divisor, e.g. 1 (MQA), 8 (GQA) or num_attention_heads (MHA)"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"the head size hidden_size/num_attention_heads = {self.head_dim} must be even, "
                "because rotary embeddings rotate pairs of dimensions"
            )
        for name in ("hidden_size", "intermediate_size", "num_key_value_heads"):
            if getattr(self, name) % self.pretraining_tp:
                raise ValueError(f"{name} ({getattr(self, name)}) must be divisible by pretraining_tp ({self.pretraining_tp})")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id ({self.pad_token_id}) must be a token id in [0, vocab_size={self.vocab_size}); "
                "after adding a pad token to the tokenizer, call model.resize_token_embeddings(len(tokenizer))"
            )
        self._validate_rope_scaling()
        self._validate_attn_implementation()

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if isinstance(rs, dict) and rs.get("type") is not None and rs["type"] not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling['type'] must be one of {list(ROPE_SCALING_TYPES)}, got {rs['type']!r}")
        if isinstance(rs, dict) and rs.get("type") == "llama3":
            self._validate_llama3_rope_scaling(rs)
            return
        if not isinstance(rs, dict) or set(rs) != {"type", "factor"}:
            raise ValueError(
                "rope_scaling must be None or a dict with exactly the fields 'type' and 'factor', "
                f"e.g. {{'type': 'linear', 'factor': 2.0}}; got {rs!r}"
            )
        if rs["type"] not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling['type'] must be one of {list(ROPE_SCALING_TYPES)}, got {rs['type']!r}")
        factor = rs["factor"]
        if not isinstance(factor, float) or not math.isfinite(factor) or factor <= 1.0:
            raise ValueError(
                f"rope_scaling['factor'] must be a float > 1 (it stretches the context by that much), "
                f"got {factor!r}; write e.g. 2.0, not 2"
            )

    def _validate_llama3_rope_scaling(self, rs: dict) -> None:
        """Llama 3.1's scaling: factor, low_freq_factor < high_freq_factor, and the context it was
        trained on before the extension (original_max_position_embeddings, 8192 for Llama 3)."""
        example = ("{'type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, "
                   "'original_max_position_embeddings': 8192}")  # fmt: skip
        if set(rs) != {"type", "factor", *LLAMA3_ROPE_FIELDS}:
            raise ValueError(f"llama3 rope_scaling needs exactly the fields of {example}; got {rs!r}")
        factor, low, high, original = (rs[k] for k in ("factor", *LLAMA3_ROPE_FIELDS))
        if not _is_number(factor) or not math.isfinite(factor) or factor < 1.0:
            raise ValueError(f"rope_scaling['factor'] must be a number >= 1 (Llama 3.1 uses 8.0), got {factor!r}")
        if not (_is_number(low) and _is_number(high) and 0 < low < high):
            raise ValueError(f"llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor (Llama 3.1: 1.0 and 4.0), got {low!r} and {high!r}")
        if not isinstance(original, int) or isinstance(original, bool) or original < 1:
            raise ValueError(f"rope_scaling['original_max_position_embeddings'] must be a positive int (8192 for Llama 3), got {original!r}")

    def _validate_attn_implementation(self) -> None:
        if self._attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation {self._attn_implementation!r} is unknown; "
                f"use one of {list(ATTENTION_IMPLEMENTATIONS)}"
            )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict, in the form transformers writes to ``config.json``."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_")}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["model_type"] = self.model_type
        if out.get("torch_dtype") is not None and not isinstance(out["torch_dtype"], str):
            out["torch_dtype"] = str(out["torch_dtype"]).replace("torch.", "")
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> "LlamaConfig":
        return cls(**{**d, **overrides})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` atomically (a temporary file renamed into place)."""
        atomic_write_bytes(path, self.to_json_string().encode())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        d = read_json_object(path, "is it really a config.json?")
        mt = d.get("model_type", "llama")
        if mt != "llama":
            raise ValueError(f"{path} describes a {mt!r} model, not a Llama ('model_type' should be 'llama')")
        return cls(**d)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` into ``save_directory`` (created if needed)."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        self.to_json_file(Path(save_directory) / "config.json")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "LlamaConfig":
        """Read ``config.json`` from a directory (or a path to the file itself), or a hub repo id."""
        p = Path(path)
        file = p if p.is_file() else resolve_file(path, "config.json")
        cfg = cls.from_json_file(file)
        for k, v in overrides.items():
            setattr(cfg, k, v)
        cfg.validate()
        return cfg

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """A named shape, e.g. ``LlamaConfig.from_preset("llama2-7b")``; see :data:`PRESETS`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})  # a preset's rope_scaling dict is not shared

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LlamaConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"LlamaConfig {self.to_json_string()}"


#: Real shapes. Llama 2 values are those of Meta's released checkpoints in the HF layout.
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                       rms_norm_eps=1e-5),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096,
                       rms_norm_eps=1e-5),
    # llama2.c's tinyllamas, trained on TinyStories.
    "stories260k": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                        rms_norm_eps=1e-5, tie_word_embeddings=True),
    "stories15m": dict(vocab_size=32000, hidden_size=288, intermediate_size=768, num_hidden_layers=6,
                       num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=256,
                       rms_norm_eps=1e-5, tie_word_embeddings=True),
    # Llama 3: a 128,256-token vocabulary, GQA with 8 KV heads in every size, rope_theta 500,000.
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001),
    # Llama 3.1 / 3.2: 131,072 positions through llama3 RoPE scaling; the 3.2 small sizes tie embeddings.
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                        rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
                        rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                        rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
                        tie_word_embeddings=True,
                        rope_scaling=dict(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    # A few-thousand-parameter model for unit tests and shape demos.
    "tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
}
