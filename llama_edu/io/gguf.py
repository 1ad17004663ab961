"""GGUF, written out: export a Hugging Face-layout Llama for llama.cpp, Ollama and LM Studio.

A GGUF file (version 3, little-endian) is four parts, in this order::

    header        b"GGUF", version (uint32), tensor count (uint64), metadata count (uint64)
    metadata      key/value pairs: key = string, value type (uint32), value
                  (a string is a uint64 byte length + UTF-8 bytes, no terminator; an array is
                  element type (uint32), count (uint64), elements)
    tensor infos  per tensor: name (string), n_dims (uint32), dims (uint64 each, *innermost first*:
                  ggml's ne[0] is the length of a row, so a PyTorch (out, in) weight has dims
                  [in, out]), ggml type (uint32), offset (uint64, from the start of the data)
    data          padded to ``general.alignment`` (32 bytes unless the file says otherwise); each
                  tensor starts at a multiple of the alignment, its rows in PyTorch's order

Tensor types written here: F32, F16, and Q8_0: blocks of 32 values as 34 bytes, an fp16 scale
``d = max|x| / 127`` followed by 32 int8 ``round(x / d)`` (ggml rounds half away from zero). A
row whose length does not split into blocks of 32 (stories260K's feed-forward width 172) is
written as F16 instead, and the export says so.

The Q/K row permutation. Hugging Face's Llama rotates dimension i of each head together with
dimension i + head_dim/2 (``rotate_half``); llama.cpp's llama architecture rotates neighbouring
pairs (0, 1), (2, 3), ... as Meta's original code does. The q_proj and k_proj rows are therefore
written back in Meta's interleaved order (:func:`llama_edu.convert.unpermute_qk`, with the KV head
count for k). Measured with llama.cpp on the Shakespeare model over 192 tokens of its text: without
it the logits are off by up to 15 and the next-token choice changes at 60% of the positions (the
error grows with the position, so short prompts show less); with it float32 logits agree within
1e-4 and greedy decoding gives the same tokens (``tests/test_gguf.py`` measures both).

Required metadata (llama.cpp refuses a file without it): ``general.architecture`` = "llama", the
context length, embedding size, block count, feed-forward size, head counts (query and KV), RMS
epsilon, RoPE base (and linear RoPE scaling when the model has it; llama.cpp has no dynamic-NTK),
and the SentencePiece vocabulary: ``tokenizer.ggml.model`` = "llama", the tokens with their
scores and types (the SentencePiece piece types: 1 normal, 2 unknown, 3 control, 4 user-defined,
6 byte), and the BOS/EOS/UNK (and padding, when the model has one) ids.

``describe_gguf(path)`` prints a file's structure; ``read_gguf(path)`` returns it, with the byte
range of every part (notebook 17 draws them).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from ..text.bpe import SentencePieceModel
from ..config import LlamaConfig
from .convert import unpermute_qk
from .files import read_json_object
from ..modeling import LlamaForCausalLM

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
QK8_0 = 32  # values per Q8_0 block
Q8_0_BLOCK_BYTES = 2 + QK8_0  # an fp16 scale and 32 int8


class ValueType(IntEnum):
    """GGUF metadata value types."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_FORMATS = {ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
                   ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
                   ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d"}  # fmt: skip


class TensorType(IntEnum):
    """The ggml tensor types this module writes and reads (ggml's numbering)."""

    F32 = 0
    F16 = 1
    Q8_0 = 8


#: --dtype -> (the type of 2-D weights, general.file_type: LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0)
DTYPES = {"f32": (TensorType.F32, 0), "f16": (TensorType.F16, 1), "q8_0": (TensorType.Q8_0, 7)}
_DTYPE_ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "q8": "q8_0"}

#: HF name inside a layer -> GGUF name inside ``blk.N.``
HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def parse_gguf_dtype(dtype: str) -> str:
    """"f32" / "f16" / "q8_0" (or float32, fp16, ...) -> the canonical name; else a ValueError."""
    key = str(dtype).lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return key


# ============================================================================================
# Q8_0
# ============================================================================================


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_0 blocks of ``w`` (..., n) with n a multiple of 32 -> uint8 (..., n // 32 * 34).

    Per block of 32 consecutive values of a row: ``d = max|x| / 127`` stored as fp16, then
    ``q = round(x * (1/d))`` as int8, rounding half away from zero (C's ``roundf``, as ggml).
    """
    if w.shape[-1] % QK8_0:
        raise ValueError(f"Q8_0 needs rows whose length is a multiple of {QK8_0}, got {w.shape[-1]}")
    x = w.detach().float().reshape(-1, QK8_0)  # (blocks, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    v = x * inv
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8)  # roundf: half away from zero
    blocks = torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], dim=1)  # (blocks, 34)
    return blocks.reshape(*w.shape[:-1], w.shape[-1] // QK8_0 * Q8_0_BLOCK_BYTES)


def dequantize_q8_0(data: torch.Tensor | bytes | np.ndarray, n: int) -> torch.Tensor:
    """Q8_0 bytes of rows of ``n`` values -> float32 (rows, n): ``d * q`` per block."""
    raw = torch.as_tensor(np.frombuffer(bytes(data), dtype=np.uint8).copy() if isinstance(data, (bytes, bytearray, memoryview))
                          else data).reshape(-1, Q8_0_BLOCK_BYTES)
    d = raw[:, :2].contiguous().view(torch.float16).float()  # (blocks, 1)
    q = raw[:, 2:].contiguous().view(torch.int8).float()  # (blocks, 32)
    return (d * q).reshape(-1, n)


def tensor_nbytes(shape: tuple[int, ...], ttype: TensorType) -> int:
    """Bytes of a tensor of PyTorch ``shape`` stored as ``ttype``."""
    n = int(np.prod(shape)) if shape else 1
    if ttype == TensorType.Q8_0:
        return n // QK8_0 * Q8_0_BLOCK_BYTES
    return n * (4 if ttype == TensorType.F32 else 2)


def tensor_bytes(t: torch.Tensor, ttype: TensorType) -> bytes:
    """The data of ``t`` as ``ttype``, rows in PyTorch's (row-major) order."""
    if ttype == TensorType.Q8_0:
        return quantize_q8_0(t).contiguous().numpy().tobytes()
    dtype = torch.float32 if ttype == TensorType.F32 else torch.float16
    return t.detach().to(dtype).contiguous().numpy().tobytes()


# ============================================================================================
# Encoding
# ============================================================================================


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: ValueType, value: Any, elem_type: ValueType | None = None) -> bytes:
    if vtype == ValueType.STRING:
        return _string(value)
    if vtype == ValueType.ARRAY:
        assert elem_type is not None and elem_type != ValueType.ARRAY
        head = struct.pack("<IQ", elem_type, len(value))
        if elem_type == ValueType.STRING:
            return head + b"".join(_string(v) for v in value)
        return head + np.asarray(value, dtype=np.dtype(_SCALAR_FORMATS[elem_type])).tobytes()
    return struct.pack(_SCALAR_FORMATS[vtype], value)


@dataclass
class MetadataEntry:
    """One key/value pair of a GGUF file (``elem_type`` for arrays)."""

    key: str
    vtype: ValueType
    value: Any
    elem_type: ValueType | None = None

    def encode(self) -> bytes:
        return _string(self.key) + struct.pack("<I", self.vtype) + _value(self.vtype, self.value, self.elem_type)


@dataclass
class TensorPlan:
    """A tensor to write: GGUF name, PyTorch shape, type, and how to get its (converted) values."""

    name: str
    shape: tuple[int, ...]
    ttype: TensorType
    values: Callable[[], torch.Tensor]

    @property
    def dims(self) -> list[int]:  # GGUF order: innermost (row length) first
        return list(reversed(self.shape))

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.ttype)


def _pad(n: int, alignment: int) -> int:
    return (alignment - n % alignment) % alignment


def write_gguf(path: str | os.PathLike, metadata: list[MetadataEntry], tensors: list[TensorPlan],
               alignment: int = DEFAULT_ALIGNMENT) -> Path:
    """Write a GGUF file atomically: everything goes to a temporary file in the same folder,
    which replaces ``path`` only when complete (Ctrl-C or a kill never leaves a half-written
    ``path``). Tensors are converted and written one at a time (memory: one tensor)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata)))
            for entry in metadata:
                f.write(entry.encode())
            offset = 0
            for t in tensors:
                f.write(_string(t.name) + struct.pack("<I", len(t.dims)) + struct.pack(f"<{len(t.dims)}Q", *t.dims)
                        + struct.pack("<IQ", t.ttype, offset))
                offset += t.nbytes + _pad(t.nbytes, alignment)
            f.write(b"\0" * _pad(f.tell(), alignment))
            for t in tensors:
                data = tensor_bytes(t.values(), t.ttype)
                if len(data) != t.nbytes:  # a bug, never a user error: the offsets above assumed nbytes
                    raise AssertionError(f"{t.name}: {len(data)} bytes, expected {t.nbytes}")
                f.write(data + b"\0" * _pad(len(data), alignment))
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it normal rights
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# ============================================================================================
# From a Hugging Face-layout folder to GGUF
# ============================================================================================


def llama_metadata(config: LlamaConfig, name: str, file_type: int) -> list[MetadataEntry]:
    """The ``general.*`` and ``llama.*`` keys llama.cpp reads for the architecture."""
    u32, f32 = ValueType.UINT32, ValueType.FLOAT32
    head_dim = config.hidden_size // config.num_attention_heads
    md = [
        MetadataEntry("general.architecture", ValueType.STRING, "llama"),
        MetadataEntry("general.name", ValueType.STRING, name),
        MetadataEntry("general.file_type", u32, file_type),
        MetadataEntry("llama.vocab_size", u32, config.vocab_size),
        MetadataEntry("llama.context_length", u32, config.max_position_embeddings),
        MetadataEntry("llama.embedding_length", u32, config.hidden_size),
        MetadataEntry("llama.block_count", u32, config.num_hidden_layers),
        MetadataEntry("llama.feed_forward_length", u32, config.intermediate_size),
        MetadataEntry("llama.rope.dimension_count", u32, head_dim),
        MetadataEntry("llama.attention.head_count", u32, config.num_attention_heads),
        MetadataEntry("llama.attention.head_count_kv", u32, config.num_key_value_heads),
        MetadataEntry("llama.attention.layer_norm_rms_epsilon", f32, config.rms_norm_eps),
        MetadataEntry("llama.rope.freq_base", f32, config.rope_theta),
    ]
    rs = config.rope_scaling
    if rs:
        if rs.get("type") != "linear":
            raise ValueError(f"rope_scaling {rs!r}: llama.cpp has linear RoPE scaling but no {rs.get('type')!r} "
                             "scaling; export a model without it or with linear scaling")
        md += [MetadataEntry("llama.rope.scaling.type", ValueType.STRING, "linear"),
               MetadataEntry("llama.rope.scaling.factor", f32, float(rs["factor"]))]
    if file_type == DTYPES["q8_0"][1]:
        md.append(MetadataEntry("general.quantization_version", u32, 2))
    return md


def _first_id(value: Any) -> int | None:
    return value[0] if isinstance(value, (list, tuple)) and value else value if isinstance(value, int) else None


def tokenizer_metadata(sp: SentencePieceModel, config: LlamaConfig,
                       tokenizer_config: dict | None = None) -> list[MetadataEntry]:
    """The SentencePiece vocabulary as llama.cpp's "llama" tokenizer: tokens, scores, types and
    the special ids. Ids beyond the SentencePiece pieces (an embedding padded to a round size)
    take their added token's text from ``tokenizer_config.json``, else ``[PAD{id}]``."""
    tokenizer_config = tokenizer_config or {}
    n = config.vocab_size
    if len(sp.pieces) > n:
        raise ValueError(f"the tokenizer has {len(sp.pieces)} pieces but the model's vocab_size is {n}: "
                         "use the tokenizer.model the model was trained with")
    tokens, scores, types = list(sp.pieces), [float(s) for s in sp.scores], [int(t) for t in sp.types]
    added = tokenizer_config.get("added_tokens_decoder") or {}
    for i in range(len(tokens), n):
        info = added.get(str(i)) or {}
        tokens.append(info.get("content") or f"[PAD{i}]")
        scores.append(0.0)
        types.append(3 if info.get("special") else 4)  # control / user-defined
    ts = sp.trainer_spec
    ids = {"bos": _first_id(config.bos_token_id), "eos": _first_id(config.eos_token_id), "unknown": ts.get("unk_id", 0),
           "padding": config.pad_token_id if config.pad_token_id is not None else ts.get("pad_id", -1)}
    if ids["bos"] is None:
        ids["bos"] = ts.get("bos_id", 1)
    if ids["eos"] is None:
        ids["eos"] = ts.get("eos_id", 2)
    md = [
        MetadataEntry("tokenizer.ggml.model", ValueType.STRING, "llama"),
        MetadataEntry("tokenizer.ggml.tokens", ValueType.ARRAY, tokens, ValueType.STRING),
        MetadataEntry("tokenizer.ggml.scores", ValueType.ARRAY, scores, ValueType.FLOAT32),
        MetadataEntry("tokenizer.ggml.token_type", ValueType.ARRAY, types, ValueType.INT32),
    ]
    for key, value in ids.items():
        if value is not None and 0 <= value < n:  # Llama 2 has no padding token (pad_id -1): no key
            md.append(MetadataEntry(f"tokenizer.ggml.{key}_token_id", ValueType.UINT32, int(value)))
    md += [MetadataEntry("tokenizer.ggml.add_bos_token", ValueType.BOOL, bool(tokenizer_config.get("add_bos_token", True))),
           MetadataEntry("tokenizer.ggml.add_eos_token", ValueType.BOOL, bool(tokenizer_config.get("add_eos_token", False)))]
    if isinstance(tokenizer_config.get("chat_template"), str):
        md.append(MetadataEntry("tokenizer.chat_template", ValueType.STRING, tokenizer_config["chat_template"]))
    return md


def llama_tensors(model: LlamaForCausalLM, dtype: str = "f32",
                  log: Callable[[str], None] | None = print) -> list[TensorPlan]:
    """The model's weights in llama.cpp's names and layout: norms in F32, 2-D weights in
    ``dtype`` (Q8_0 rows that do not split into 32 fall back to F16, logged), q/k rows in Meta's
    interleaved RoPE order. A tied ``lm_head`` is not written (llama.cpp reuses token_embd)."""
    config = model.config
    weight_type = DTYPES[parse_gguf_dtype(dtype)][0]
    sd = model.state_dict()
    plans: list[TensorPlan] = []

    def add(name: str, t: torch.Tensor, fn: Callable[[], torch.Tensor] | None = None) -> None:
        ttype = TensorType.F32 if t.dim() == 1 else weight_type
        if ttype == TensorType.Q8_0 and t.shape[-1] % QK8_0:
            ttype = TensorType.F16
            if log:
                log(f"{name}: rows of {t.shape[-1]} values do not split into Q8_0 blocks of {QK8_0}: written as F16")
        if ttype == TensorType.F16 and bool((t.abs() > torch.finfo(torch.float16).max).any()):
            raise ValueError(f"{name} has values beyond float16's range (65504): export with --dtype f32")
        plans.append(TensorPlan(name, tuple(t.shape), ttype, fn or (lambda: t)))

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        for hf, gg in HF_TO_GGUF.items():
            t = sd[f"model.layers.{i}.{hf}"]
            if hf == "self_attn.q_proj.weight":
                add(f"blk.{i}.{gg}", t, lambda t=t: unpermute_qk(t, config.num_attention_heads))
            elif hf == "self_attn.k_proj.weight":
                add(f"blk.{i}.{gg}", t, lambda t=t: unpermute_qk(t, config.num_key_value_heads))
            else:
                add(f"blk.{i}.{gg}", t)
    add("output_norm.weight", sd["model.norm.weight"])
    if not config.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    return plans


def _check_paths(model_dir: Path, out: Path, tokenizer: Path) -> None:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist (give a Hugging Face-layout folder with config.json)")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model folder: it has no config.json (give a Hugging Face-layout "
                         "folder, e.g. data/shakespeare-llama, or convert yours with convert-meta / convert-llama2c)")
    if out.is_dir():
        raise IsADirectoryError(f"the output {out} is a folder: give a file name, e.g. {out / 'model.gguf'}")
    resolved = out.resolve()
    inputs = [tokenizer, *[p for p in model_dir.iterdir() if p.is_file()]]
    if any(resolved == p.resolve() for p in inputs):
        raise ValueError(f"the output {out} is one of the inputs: choose another file name, e.g. {out.with_suffix('.gguf')}")


def export_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f32",
                tokenizer: str | os.PathLike | None = None, name: str | None = None,
                log: Callable[[str], None] | None = print) -> Path:
    """Write the Hugging Face-layout model in ``model_dir`` (config.json, safetensors, and a
    SentencePiece ``tokenizer.model``, or ``tokenizer`` given) as a GGUF file llama.cpp loads.

    ``dtype``: "f32", "f16" or "q8_0" for the 2-D weights (norms stay F32). Atomic: the file
    appears whole or not at all. Returns the path written."""
    model_dir, out = Path(model_dir), Path(out_path)
    dtype = parse_gguf_dtype(dtype)
    tok_path = Path(tokenizer) if tokenizer is not None else model_dir / "tokenizer.model"
    _check_paths(model_dir, out, tok_path)
    cfg = read_json_object(model_dir / "config.json", "it should be a model's config.json")
    if cfg.get("quantization_config"):
        raise ValueError(f"{model_dir} holds quantized weights (quantization_config in config.json): export the "
                         "unquantized model and let GGUF quantize it (--dtype q8_0)")
    if tokenizer is not None and not tok_path.is_file():
        raise FileNotFoundError(f"tokenizer {tok_path} does not exist: give the model's SentencePiece tokenizer.model")
    if not tok_path.is_file():
        raise FileNotFoundError(f"no tokenizer.model in {model_dir}: GGUF files carry their vocabulary; "
                                "give the model's SentencePiece tokenizer.model with --tokenizer PATH")
    try:
        sp = SentencePieceModel.from_file(tok_path)
    except ValueError as e:  # e.g. Llama 3's tiktoken file, which this exporter does not write
        raise ValueError(f"{tok_path}: {e}; export-gguf writes Llama 2's SentencePiece vocabulary "
                         "(give a SentencePiece tokenizer.model with --tokenizer)") from None
    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = read_json_object(tok_cfg_path, "it should be a tokenizer_config.json") if tok_cfg_path.is_file() else {}
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    metadata = llama_metadata(model.config, name or model_dir.resolve().name, DTYPES[dtype][1])
    metadata += tokenizer_metadata(sp, model.config, tok_cfg)
    return write_gguf(out, metadata, llama_tensors(model, dtype, log))


# ============================================================================================
# Reading
# ============================================================================================


@dataclass
class TensorInfo:
    """A tensor's entry in a GGUF file; ``span`` is the byte range of its info record."""

    name: str
    dims: list[int]  # GGUF order: innermost first
    ttype: int
    offset: int  # from the start of the data section
    span: tuple[int, int]

    @property
    def shape(self) -> tuple[int, ...]:  # PyTorch order
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        return TensorType(self.ttype).name if self.ttype in TensorType._value2member_map_ else f"type {self.ttype}"


@dataclass
class GGUFFile:
    """The structure of a GGUF file: header, metadata (with each entry's byte range), tensor
    infos, where the data starts."""

    path: Path
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    types: dict[str, tuple[ValueType, ValueType | None]] = field(default_factory=dict)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> byte range of the entry
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_start: int = 0
    file_size: int = 0

    def tensor_data(self, info: TensorInfo) -> torch.Tensor:
        """A tensor's values as float32, in PyTorch's shape (F32, F16 and Q8_0)."""
        n = int(np.prod(info.dims))
        nbytes = tensor_nbytes(info.shape, TensorType(info.ttype))
        with open(self.path, "rb") as f:
            f.seek(self.data_start + info.offset)
            raw = f.read(nbytes)
        if info.ttype == TensorType.Q8_0:
            return dequantize_q8_0(raw, info.dims[0]).reshape(info.shape)
        dt = np.float32 if info.ttype == TensorType.F32 else np.float16
        return torch.from_numpy(np.frombuffer(raw, dtype=dt, count=n).astype(np.float32)).reshape(info.shape)


class _Reader:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ValueError(f"{self.path} is truncated (wanted {n} bytes at offset {self.f.tell() - len(b)}): "
                             "it is not a complete GGUF file")
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > 1 << 30:
            raise ValueError(f"{self.path}: a string of {n} bytes at offset {self.f.tell() - 8}: not a GGUF file")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> tuple[Any, ValueType | None]:
        if vtype == ValueType.STRING:
            return self.string(), None
        if vtype == ValueType.ARRAY:
            elem, count = self.unpack("<I"), self.unpack("<Q")
            if elem == ValueType.STRING:
                return [self.string() for _ in range(count)], ValueType(elem)
            if elem not in _SCALAR_FORMATS:
                raise ValueError(f"{self.path}: unknown array element type {elem}")
            dt = np.dtype(_SCALAR_FORMATS[ValueType(elem)])
            return np.frombuffer(self.read(dt.itemsize * count), dtype=dt).tolist(), ValueType(elem)
        if vtype not in _SCALAR_FORMATS:
            raise ValueError(f"{self.path}: unknown metadata value type {vtype}")
        return self.unpack(_SCALAR_FORMATS[ValueType(vtype)]), None


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor infos (the data is not read)."""
    path = Path(path)
    with open(path, "rb") as f:
        r = _Reader(f, path)
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        version, n_tensors, n_kv = r.unpack("<I"), r.unpack("<Q"), r.unpack("<Q")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        g = GGUFFile(path, version, file_size=path.stat().st_size)
        for _ in range(n_kv):
            start = f.tell()
            key, vtype = r.string(), r.unpack("<I")
            value, elem = r.value(vtype)
            g.metadata[key], g.types[key], g.spans[key] = value, (ValueType(vtype), elem), (start, f.tell())
        g.alignment = int(g.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        for _ in range(n_tensors):
            start = f.tell()
            name, n_dims = r.string(), r.unpack("<I")
            dims = [r.unpack("<Q") for _ in range(n_dims)]
            ttype, offset = r.unpack("<I"), r.unpack("<Q")
            g.tensors.append(TensorInfo(name, dims, ttype, offset, (start, f.tell())))
        g.data_start = f.tell() + _pad(f.tell(), g.alignment)
    return g


def _short(value: Any, elem: ValueType | None) -> str:
    if isinstance(value, list):
        items = ", ".join(repr(v) for v in value[:5])
        return f"[{items}{', ...' if len(value) > 5 else ''}] ({len(value)} x {elem.name if elem else '?'})"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_gguf(path: str | os.PathLike, max_tensors: int = 12, file: Any = None) -> None:
    """Print the structure of a GGUF file: header, every metadata entry (arrays shortened),
    the tensor infos (the first ``max_tensors``), alignment and the data section."""
    g = read_gguf(path)
    out = file or sys.stdout
    p = lambda s="": print(s, file=out)  # noqa: E731
    p(f"{Path(path).name}: GGUF v{g.version}, {g.file_size:,} bytes")
    p(f"  header      bytes 0-23: magic 'GGUF', version {g.version}, {len(g.tensors)} tensors, {len(g.metadata)} metadata entries")
    p(f"  metadata    bytes 24-{max(e for _, e in g.spans.values()) - 1 if g.spans else 23}:")
    for key, value in g.metadata.items():
        vtype, elem = g.types[key]
        p(f"    {key:<42} {vtype.name:<7} {_short(value, elem)}")
    first = g.tensors[0].span[0] if g.tensors else g.data_start
    p(f"  tensor info bytes {first}-{g.tensors[-1].span[1] - 1 if g.tensors else first}: name, dims (innermost first), type, offset")
    for t in g.tensors[:max_tensors]:
        p(f"    {t.name:<26} dims {str(t.dims):<14} {t.type_name:<5} offset {t.offset:>10,}")
    if len(g.tensors) > max_tensors:
        p(f"    ... {len(g.tensors) - max_tensors} more")
    end = g.tensors[-1].span[1] if g.tensors else first
    p(f"  padding     {g.data_start - end} zero bytes, so the data starts at a multiple of {g.alignment}")
    p(f"  data        bytes {g.data_start:,}-{g.file_size - 1:,}")
