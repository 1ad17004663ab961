"""Saving and loading models in the Hugging Face layout, so checkpoints move both ways between
llama_edu and transformers.

A checkpoint folder holds

    config.json                          the LlamaConfig, plus ``torch_dtype`` and ``architectures``
    model.safetensors                    all weights, or, above ``max_shard_size``:
    model-00001-of-00003.safetensors     shards ...
    model.safetensors.index.json         {"metadata": {"total_size": bytes}, "weight_map": {key: shard}}

(``pytorch_model.bin`` / ``pytorch_model-0000N-of-0000M.bin`` + ``pytorch_model.bin.index.json``
for the older pickle format, which we read only through ``torch.load(weights_only=True)``.)

Loading takes no more memory than the weights need: the model is built on the ``meta`` device
(shapes, no storage). When the file holds the dtype asked for and the model stays on the CPU,
every parameter is a view of the memory-mapped safetensors file (zero-copy, copy-on-write: a
LoRA merge or training step copies only what it writes). Otherwise each tensor is read, converted
to the target dtype/device and placed one at a time. Either way ``load_state_dict(assign=True)``
puts the tensors in the model without a second copy. Saving is atomic: the complete new set of
files replaces the previous checkpoint at once, or not at all, also under concurrent saves
(:mod:`atomic_save`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .atomic_save import replace_folder_files
from ..config import TRANSFORMERS_VERSION, LlamaConfig
from .files import resolve_file
from ..quant.quantize import prepare_quantized_model, quantized_checkpoint_hint

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
#: What we look for, in transformers' order of preference.
#: A quantized model's weights (int8 codes, scales) go under another name: transformers finds no
#: weights in such a folder and refuses it, instead of building the model from its config with
#: random weights (it does not know our quantization_config). Folders saved before the rename,
#: with the plain names, still load here.
QUANTIZED_WEIGHTS_NAME = "quantized_model.safetensors"
QUANTIZED_WEIGHTS_INDEX_NAME = "quantized_model.safetensors.index.json"
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
                QUANTIZED_WEIGHTS_NAME, QUANTIZED_WEIGHTS_INDEX_NAME)

#: Weights that belong to a task head rather than to the shared LlamaModel body.
HEAD_KEYS = ("lm_head.weight", "score.weight")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "double": torch.float64,
}
# safetensors header dtype names
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


# --------------------------------------------------------------------------------------------
# Small parsers
# --------------------------------------------------------------------------------------------
def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """None -> float32; "auto" stays "auto"; "float16"/"fp16"/"torch.float16"/torch.float16 -> the dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"torch_dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"unknown torch_dtype {dtype!r}; use 'auto', 'float32', 'float16', 'bfloat16' or a torch.dtype")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "float16" (the form config.json uses)."""
    return str(dtype).removeprefix("torch.")


def parse_size(size: int | str) -> int:
    """Bytes from ``5_000_000`` or ``"5MB"``/``"5GB"`` (powers of 1000) or ``"5MiB"``/``"5GiB"``
    (powers of 1024), as transformers reads ``max_shard_size``."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if m:
            unit = (m.group(2) or "B").upper()
            scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                     "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
            n = int(float(m.group(1)) * scale)
            if n > 0:
                return n
    raise ValueError(f"max_shard_size {size!r} is not a size; use bytes (int) or a string like '200MB' or '5GB'")


def parse_device(device: str | torch.device | int | None, default: str = "cpu") -> torch.device:
    """A torch.device from ``"cpu"``, ``"cuda:0"``, ``0``, a torch.device, ``"auto"`` (cuda when
    available, else cpu) or None (``default``). Unknown names, the meta device (a model there
    holds no weights) and a CUDA device on a machine without one are clear errors."""
    if device is None:
        device = default
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e}); use 'cpu', 'cuda', 'cuda:0', 'mps' or 'auto'") from None
    if parsed.type == "meta":
        raise ValueError("device 'meta' holds no weights; use 'cpu', 'cuda' or 'auto'")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asks for CUDA but no CUDA GPU is available here; use 'cpu' or 'auto'")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ValueError(f"device {device!r}: this machine has {n} CUDA device(s); use cuda:0 .. cuda:{n - 1} or 'auto'")
    if parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        why = "this PyTorch build has no MPS support" if not torch.backends.mps.is_built() else "no Apple GPU is available"
        raise ValueError(f"device {device!r}: {why}; use 'cpu' or 'auto'")
    if parsed.type not in ("cpu", "cuda", "mps"):
        backend = getattr(torch, parsed.type, None)  # torch.xpu, ...: each has is_available()
        if not (callable(getattr(backend, "is_available", None)) and backend.is_available()):
            raise ValueError(f"device {device!r}: this PyTorch build or machine has no {parsed.type} device; use 'cpu' or 'auto'")
    return parsed


# --------------------------------------------------------------------------------------------
# Reading weight files
# --------------------------------------------------------------------------------------------
def _check_inside(folder: Path, name: str, named_by: str) -> None:
    """Refuse a weight file that is not a plain file inside ``folder``: a name with ``..`` or an
    absolute path, or a symlink (or a symlinked folder) leading elsewhere, could make a
    downloaded checkpoint read any file on the machine. The Hugging Face cache's own links
    (``snapshots/REV/name`` -> ``../../blobs/HASH``) are allowed."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not p.parts or name != name.strip():
        raise ValueError(
            f"refused to load {folder}: {named_by} names the weight file {name!r}, which is not inside the "
            "checkpoint folder; a weight_map must name files in the folder, like 'model-00001-of-00002.safetensors'"
        )
    real_folder = folder.resolve()
    target = (folder / p).resolve()
    if target.is_relative_to(real_folder):
        inside = True
    else:
        repo = next((a.parent for a in real_folder.parents if a.name == "snapshots"), None)
        inside = repo is not None and target.parent == repo / "blobs"
    if not inside:
        raise ValueError(
            f"refused to load {folder}: the weight file {name!r} is a link to {target}, outside the checkpoint "
            "folder. If you trust it, replace the link by the file itself (cp -L)"
        )
    if target.exists() and not target.is_file():
        raise ValueError(f"refused to load {folder}: the weight file {name!r} is not a regular file")


def find_weight_files(path_or_repo: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint, in order: one file, or the shards its index names.
    In a local folder, every file must stay inside it (see :func:`_check_inside`); nothing is
    read before all names are checked."""
    local = Path(path_or_repo).expanduser()
    local = local if local.is_dir() else None
    for name in WEIGHT_FILES:
        f = resolve_file(path_or_repo, name, missing_ok=True)
        if f is None:
            continue
        if local is not None:
            _check_inside(local, name, "the folder")
        if not name.endswith(".index.json"):
            return [f]
        try:
            index = json.loads(f.read_text())
            shard_names = list(dict.fromkeys(index["weight_map"].values()))
            if not all(isinstance(s, str) for s in shard_names):
                raise ValueError("the weight_map's values must be file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError, ValueError) as e:
            raise OSError(f"{f} is not a valid weight index (expected {{'weight_map': {{key: file}}}}): {e}") from None
        for shard in shard_names:  # all names first: refuse before reading any shard
            if local is not None:
                _check_inside(local, shard, f.name)
            elif Path(shard).is_absolute() or ".." in Path(shard).parts:
                _check_inside(Path("."), shard, f.name)  # raises: a hub repo cannot name files outside it either
        files = []
        for shard in shard_names:
            sf = resolve_file(path_or_repo, shard, missing_ok=True)
            if sf is None:
                raise FileNotFoundError(f"{f.name} in {path_or_repo} names the shard {shard}, which is missing; the download or save is incomplete")
            files.append(sf)
        return files
    raise FileNotFoundError(
        f"no weights in {path_or_repo}: expected one of {', '.join(WEIGHT_FILES)}"
    )


class _WeightFile:
    """One safetensors or pickle weight file, opened lazily: keys, shapes and dtypes come from the
    header (safetensors) or a memory-mapped ``torch.load``; tensors are read one at a time.

    A safetensors file is an 8-byte little-endian header length, a JSON header
    ``{key: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}}`` and the raw bytes.
    ``safe_open`` validates it. :meth:`mapped` then gives a tensor that *is* the bytes in the file:
    a private (copy-on-write) memory map, file-backed pages the OS reads on first use and may drop
    again, so loading takes no memory of its own; writing to the tensor copies only the pages
    written, never the file. :meth:`tensor` reads the bytes into a fresh tensor instead, for a
    conversion to another dtype or device."""

    def __init__(self, path: Path):
        self.path = path
        self.is_safetensors = path.suffix == ".safetensors"
        try:
            if self.is_safetensors:
                from safetensors import safe_open

                self._handle = safe_open(str(path), framework="pt", device="cpu")  # validates the file
                self.keys = list(self._handle.keys())
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    self._header = json.loads(f.read(n))
                self._data_start = 8 + n
            else:
                self._handle = load_torch_state_dict(path)
                self.keys = list(self._handle.keys())
        except OSError:
            raise
        except Exception as e:  # safetensors_rust.SafetensorError, RuntimeError from zip reading, ...
            raise OSError(f"could not read {path}: it is corrupt or truncated ({type(e).__name__}: {e}); re-download or re-save it") from None

    def shape(self, key: str) -> tuple[int, ...]:
        if self.is_safetensors:
            return tuple(self._handle.get_slice(key).get_shape())
        return tuple(self._handle[key].shape)

    def dtype(self, key: str) -> torch.dtype | None:
        if self.is_safetensors:
            return _SAFETENSORS_DTYPES.get(self._handle.get_slice(key).get_dtype())
        return self._handle[key].dtype

    def dtype_name(self, key: str) -> str:
        """The stored dtype as the file names it ("I8", "F16", ... or "torch.int8")."""
        return self._handle.get_slice(key).get_dtype() if self.is_safetensors else str(self._handle[key].dtype)

    def mapped(self, key: str) -> torch.Tensor | None:
        """The tensor ``key`` as a view of the memory-mapped file, or None where that cannot be
        (a pickle file, an unusual dtype, data not aligned to its element size)."""
        if not self.is_safetensors:
            return None
        info = self._header[key]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        begin, end = (self._data_start + offset for offset in info["data_offsets"])
        if dtype is None or begin % dtype.itemsize:
            return None
        if getattr(self, "_map", None) is None:
            size = self.path.stat().st_size
            storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=size)
            self._map = torch.empty(0, dtype=torch.uint8).set_(storage)  # the whole file, as bytes
        return self._map[begin:end].view(dtype).view(info["shape"])

    def tensor(self, key: str) -> torch.Tensor:
        if not self.is_safetensors:
            return self._handle[key]
        info = self._header[key]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:  # rare dtypes (ints, fp8): let safetensors decode them
            return self._handle.get_tensor(key)
        begin, end = info["data_offsets"]
        t = torch.empty(info["shape"], dtype=dtype)
        buf = t.reshape(-1).view(torch.uint8).numpy()
        if buf.nbytes != end - begin:
            raise OSError(f"{self.path} is corrupt: {key} has {end - begin} bytes for shape {info['shape']} {info['dtype']}")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(buf) != buf.nbytes:
                raise OSError(f"could not read {key} from {self.path}: the file is truncated")
        return t


def load_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` of a pickle checkpoint (``pytorch_model.bin``, Meta's ``consolidated.NN.pth``)
    that refuses anything but tensors (weights_only), memory-mapped when the file format allows."""
    import pickle  # only for its exception class

    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise OSError(
            f"refused to load {path}: it contains Python objects other than tensors, and unpickling "
            f"them could run arbitrary code ({str(e).splitlines()[0]}). Only if you trust its source, "
            "convert it yourself with torch.load(..., weights_only=False) and save it as safetensors"
        ) from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, a file of another format, ...
        raise OSError(f"could not read {path}: it is corrupt or truncated ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict (names -> tensors); is it a checkpoint?")
    return sd


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
#: In-place tensor methods that only (re)initialise values: skipped while loading.
_INIT_METHODS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_})


class _SkipInitMode(torch.overrides.TorchFunctionMode):
    """Turns every ``torch.nn.init.*_`` call and every ``normal_``/``uniform_``/``zero_``/``fill_``
    into a no-op that returns its tensor. A torch-function mode is thread-local, so a model
    built at the same time in another thread is initialised as usual (patching ``nn.init`` or
    ``_init_weights`` globally, as transformers' ``no_init_weights`` does, would reach it)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INIT_METHODS or (getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_")):
            return args[0] if args else kwargs.get("tensor")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _skip_init(cls: type[nn.Module]) -> Iterator[None]:
    """Build a model without initialising its weights (they are overwritten by the checkpoint),
    as transformers' ``no_init_weights`` does, but for this thread only. On the meta device
    nothing would be computed anyway, but the first ``normal_`` on a meta tensor imports
    PyTorch's Python meta kernels (~2 s and ~70 MB once per process). ``cls`` is unused: kept
    so callers need not change."""
    del cls
    with _SkipInitMode():
        yield


def _rename_keys(ckpt_keys: Iterable[str], model_keys: set[str], prefix: str) -> dict[str, str]:
    """Map checkpoint keys to model keys, adding or stripping the base-model prefix ``model.``
    as transformers does when a head checkpoint loads into LlamaModel or the other way round."""
    ckpt_keys = list(ckpt_keys)
    model_has = any(k.startswith(prefix) for k in model_keys)
    ckpt_has = any(k.startswith(prefix) for k in ckpt_keys)
    if ckpt_has and not model_has:  # LlamaForCausalLM checkpoint -> LlamaModel
        return {k: k[len(prefix):] if k.startswith(prefix) else k for k in ckpt_keys}
    if model_has and not ckpt_has:  # LlamaModel checkpoint -> a model with a head
        return {k: prefix + k for k in ckpt_keys}
    return {k: k for k in ckpt_keys}


def _config_mismatches(config: LlamaConfig, shapes: dict[str, tuple[int, ...]], prefix: str) -> list[str]:
    """Sentences naming config fields that disagree with the weights' shapes."""
    def get(key):
        return shapes.get(prefix + key, shapes.get(key))

    problems = []
    emb = get("embed_tokens.weight")
    if emb is not None and len(emb) == 2:
        if emb[1] != config.hidden_size:
            problems.append(f"config says hidden_size={config.hidden_size} but the weights have {emb[1]} (embed_tokens.weight is {emb})")
        if emb[0] != config.vocab_size:
            problems.append(f"config says vocab_size={config.vocab_size} but the weights have {emb[0]} (embed_tokens.weight is {emb})")
    layers = {int(m.group(1)) for k in shapes for m in [re.search(r"layers\.(\d+)\.", k)] if m}
    if layers and max(layers) + 1 != config.num_hidden_layers:
        problems.append(f"config says num_hidden_layers={config.num_hidden_layers} but the weights have {max(layers) + 1} layers")
    gate = get("layers.0.mlp.gate_proj.weight")
    if gate is not None and gate[0] != config.intermediate_size:
        problems.append(f"config says intermediate_size={config.intermediate_size} but the weights have {gate[0]}")
    k_proj = get("layers.0.self_attn.k_proj.weight")
    if k_proj is not None and k_proj[0] != config.num_key_value_heads * config.head_dim:
        problems.append(
            f"config says num_key_value_heads={config.num_key_value_heads} (x head_dim {config.head_dim}) "
            f"but k_proj has {k_proj[0]} output rows"
        )
    return problems


def load_pretrained(
    cls: type[nn.Module],
    path_or_repo: str | os.PathLike,
    *,
    config: LlamaConfig | None = None,
    torch_dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    progress: bool = True,
    low_cpu_mem_usage: bool | None = None,
    mmap: bool = True,
    **config_overrides: Any,
) -> nn.Module:
    """Build ``cls`` (LlamaForCausalLM, LlamaModel or LlamaForSequenceClassification) from a
    Hugging Face-layout checkpoint folder or hub repo id, as ``transformers``' ``from_pretrained``.

    ``torch_dtype``: None -> float32 (whatever the file holds), "auto" -> config.json's
    ``torch_dtype`` (else the weights' dtype), or an explicit dtype to convert to.
    ``device``: where the weights go ("cpu" default, "cuda", ...). ``config_overrides`` set config
    fields (e.g. ``num_labels=3``). ``low_cpu_mem_usage`` is accepted for compatibility; loading
    is always low-memory. ``mmap=False`` reads the weights into the process's own memory even
    when they could stay mapped from the file (then the file may be deleted or changed in place).
    Returns the model in ``eval()`` mode.
    """
    del low_cpu_mem_usage
    # -- config -------------------------------------------------------------------------------
    if config is None:
        config = LlamaConfig.from_pretrained(path_or_repo)
    elif not isinstance(config, LlamaConfig):
        raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
    else:
        config = copy.deepcopy(config)
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise TypeError(f"from_pretrained got an unexpected argument {key!r} (it is not a LlamaConfig field either)")
        setattr(config, key, value)
    if attn_implementation is not None:
        config.attn_implementation = attn_implementation
    config.validate()
    target_device = parse_device(device)

    # -- what the files hold ------------------------------------------------------------------
    files = [_WeightFile(f) for f in find_weight_files(path_or_repo)]
    where: dict[str, _WeightFile] = {}
    for wf in files:
        for k in wf.keys:
            where[k] = wf

    dtype = parse_dtype(torch_dtype)
    if dtype == "auto":
        if config.torch_dtype:
            dtype = parse_dtype(config.torch_dtype)
        else:
            first = next((k for k in where if not k.endswith("inv_freq")), None)
            dtype = (where[first].dtype(first) if first else None) or torch.float32

    # -- build without memory, then match keys ------------------------------------------------
    with torch.device("meta"), _skip_init(cls):
        model = cls(config)
    qconfig = getattr(config, "quantization_config", None)  # a checkpoint written by llama_edu.quantize
    keep_dtype = prepare_quantized_model(model, qconfig, path_or_repo) if qconfig is not None else set()
    prefix = getattr(cls, "base_model_prefix", "model") + "."
    model_sd = model.state_dict(keep_vars=True)
    expected = {k: tuple(v.shape) for k, v in model_sd.items()}
    tied = bool(config.tie_word_embeddings) and model.get_output_embeddings() is not None
    if tied:
        expected.pop("lm_head.weight", None)  # comes from embed_tokens after re-tying

    ckpt_keys = [k for k in where if not k.endswith("rotary_emb.inv_freq")]  # old HF files kept these buffers
    rename = _rename_keys(ckpt_keys, set(expected), prefix)
    if tied:
        rename = {src: dst for src, dst in rename.items() if dst != "lm_head.weight"}
    found = {dst: src for src, dst in rename.items()}
    shapes = {dst: where[src].shape(src) for src, dst in rename.items()}

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    head_missing = [k for k in missing if k in HEAD_KEYS]
    head_unused = [k for k in unexpected if k in HEAD_KEYS]
    body_missing = [k for k in missing if k not in HEAD_KEYS]
    body_unexpected = [k for k in unexpected if k not in HEAD_KEYS]
    bad_shapes = [(k, expected[k], shapes[k]) for k in expected if k in found and shapes[k] != expected[k]]

    if body_missing or body_unexpected or bad_shapes:
        lines = [f"the weights in {path_or_repo} do not fit {cls.__name__} built from its config:"]
        mismatch = _config_mismatches(config, shapes, prefix)
        if mismatch:
            lines.append("the config does not match the weights: " + "; ".join(mismatch) + ". Use the config.json saved with the weights (or fix it).")
        if bad_shapes:
            lines.append("shape mismatches: " + "; ".join(f"{k}: expected {tuple(e)}, found {tuple(f)}" for k, e, f in bad_shapes[:10])
                         + (f" (and {len(bad_shapes) - 10} more)" if len(bad_shapes) > 10 else ""))
        if body_missing:
            lines.append(f"missing keys ({len(body_missing)}): {body_missing[:10]}" + (" ..." if len(body_missing) > 10 else ""))
        if body_unexpected:
            lines.append(f"unexpected keys ({len(body_unexpected)}): {body_unexpected[:10]}" + (" ..." if len(body_unexpected) > 10 else ""))
            hint = quantized_checkpoint_hint(body_unexpected)
            if hint:
                lines.append(hint)
        raise ValueError("\n".join(lines))
    not_float = [(k, where[found[k]]) for k in expected if k in found and model_sd[k].is_floating_point()]
    not_float = [(k, wf) for k, wf in not_float if not (wf.dtype(found[k]) or torch.int8).is_floating_point]
    if not_float:
        k, wf = not_float[0]
        name = wf.dtype_name(found[k])
        hint = (" It looks quantized, but config.json has no quantization_config: a model quantized by llama_edu "
                "loads with the config.json saved beside it") if name.lower().replace("torch.", "") in ("i8", "u8", "int8", "uint8") else ""
        raise ValueError(
            f"the weights in {path_or_repo} hold {len(not_float)} tensor(s) that are not floating point, e.g. {k} "
            f"is stored as {name}; a weight must be float32, float16 or bfloat16.{hint}"
        )
    if head_unused:
        warnings.warn(
            f"Some weights of the checkpoint at {path_or_repo} were not used when initializing {cls.__name__}: "
            f"{head_unused}. This IS expected if you are initializing {cls.__name__} from the checkpoint of a "
            "model with another head (e.g. LlamaModel from LlamaForCausalLM).",
            stacklevel=3,
        )
    if head_missing:
        hint = ""
        if "lm_head.weight" in head_missing and not config.tie_word_embeddings and not head_unused:
            hint = " If the checkpoint was saved with tied embeddings, pass tie_word_embeddings=True."
        warnings.warn(
            f"Some weights of {cls.__name__} were not initialized from the model checkpoint at {path_or_repo} "
            f"and are newly initialized: {head_missing}. You should probably TRAIN this model on a down-stream "
            f"task to be able to use it for predictions and inference.{hint}",
            stacklevel=3,
        )

    # -- materialise, one tensor at a time ------------------------------------------------------
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for dst in expected:
        if dst in found:
            by_file.setdefault(where[found[dst]].path, []).append(dst)
    from tqdm.auto import tqdm

    total_bytes = sum(f.path.stat().st_size for f in files)
    show = progress and (len(files) > 1 or total_bytes > 2**30)
    bar = tqdm(total=len(found), desc="Loading weights", unit="tensor", disable=not show)
    for wf in files:
        for dst in by_file.get(wf.path, []):
            key = found[dst]
            # Zero-copy when the file already holds what is asked for, on the CPU.
            t = wf.mapped(key) if mmap and target_device.type == "cpu" and wf.dtype(key) == dtype else None
            if t is None:
                t = wf.tensor(key)
                if t.is_floating_point() and dst not in keep_dtype:  # quantization scales keep their dtype
                    # copy=True detaches pickle-file tensors from their memory map; safetensors
                    # ones are fresh already, and .to() with nothing to do is free.
                    t = t.to(device=target_device, dtype=dtype, copy=not wf.is_safetensors)
            state[dst] = t
            bar.update(1)
    bar.close()
    for dst in head_missing:  # fresh heads: real storage now, initialised below
        state[dst] = torch.empty(expected[dst], device=target_device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    for dst in head_missing:
        model._init_weights(model.get_submodule(dst.rsplit(".", 1)[0]))
    model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # every parameter should be real by now; a bug here must not pass silently
        raise RuntimeError(f"internal error: parameters {leftover} were not loaded")
    return model.eval()


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _write_weights(tensors: dict[str, torch.Tensor], path: Path, safe_serialization: bool) -> None:
    """Write one weight file (a helper so tests can make a write fail midway)."""
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt"})  # transformers requires "format"
    else:
        torch.save(tensors, path)


def _write_json(obj: Any, path: Path) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


#: Names of the files a checkpoint save replaces (any shard layout, either format); everything
#: else in the folder (a README, generation_config.json, tokenizer files, notes) is kept.
CHECKPOINT_FILE = re.compile(
    r"^(config\.json|((quantized_)?model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin)(\.index\.json)?)$"
)


def write_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    save_directory: str | os.PathLike,
    config: dict[str, Any] | None,
    *,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    extra_files: dict[str, Any] | None = None,
    atomic: bool = True,
) -> list[Path]:
    """Stream ``(key, tensor)`` pairs into an HF-layout folder, atomically.

    Shards are cut as transformers cuts them (a new shard when the next tensor would exceed
    ``max_shard_size``; a bigger tensor gets a shard of its own), so only one shard is in memory
    at a time: converters can produce tensors lazily. ``config`` (a dict) becomes config.json;
    ``extra_files`` maps a file name to a dict (written as JSON) or a source Path (copied).

    The whole set of files replaces the previous checkpoint at once, or not at all (see
    :mod:`llama_edu.atomic_save`): it is written into a hidden folder beside ``save_directory``
    and swapped in, under a lock, so a crash, Ctrl-C or a concurrent save never leaves a mixture
    of two models. The previous checkpoint's files (config.json and weights in any layout) and
    the ``extra_files`` names are replaced; every other file in the folder is kept. Returns the
    final paths. ``atomic=False`` writes straight into ``save_directory``: for a caller that
    stages a larger set of files itself (a training checkpoint: weights, optimizer, state).
    """
    limit = parse_size(max_shard_size)
    out = Path(save_directory)
    quantized = isinstance(config, dict) and config.get("quantization_config") is not None
    if quantized and not safe_serialization:
        raise ValueError("a quantized model is saved as safetensors only (quantized_model.safetensors); "
                         "drop safe_serialization=False")
    extra_names = set(extra_files or {})
    for name in extra_names:
        if Path(name).name != name or name in (".", ".."):
            raise ValueError(f"extra file name {name!r} must be a plain file name, without folders")

    def owned(name: str) -> bool:
        return bool(CHECKPOINT_FILE.match(name)) or name in extra_names

    if not atomic:
        out.mkdir(parents=True, exist_ok=True)
    with replace_folder_files(out, owned) if atomic else contextlib.nullcontext(out) as staging:
        shards: list[list[str]] = []
        current: dict[str, torch.Tensor] = {}
        storages: set[int] = set()  # of the tensors in `current`
        current_size = total_size = 0

        def flush():
            _write_weights(current, staging / f"shard{len(shards)}.tmp", safe_serialization)
            shards.append(list(current))

        seen: dict[str, None] = {}
        for key, t in tensors:
            if key in seen:
                raise ValueError(f"the key {key} appears twice in the state dict")
            seen[key] = None
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"the state dict's {key!r} is a {type(t).__name__}, not a tensor; only tensors can be saved")
            # safetensors refuses views into shared storage; a contiguous CPU copy is what we store.
            t = t.detach().to("cpu").contiguous()
            if not safe_serialization:
                t = t.clone()  # torch.save would otherwise write the whole underlying storage
            size = _tensor_bytes(t)
            if current and current_size + size > limit:
                flush()
                current, current_size, storages = {}, 0, set()
            if t.untyped_storage().data_ptr() in storages:
                t = t.clone()  # shares memory with a tensor of this shard (weights tied by hand): its own copy
            storages.add(t.untyped_storage().data_ptr())
            current[key] = t
            current_size += size
            total_size += size
        if current or not shards:
            flush()
        current = {}

        single = QUANTIZED_WEIGHTS_NAME if quantized else SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
        stem, ext = single.rsplit(".", 1)
        n = len(shards)
        final_names = [single] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)]
        for i, name in enumerate(final_names):
            os.rename(staging / f"shard{i}.tmp", staging / name)
        written = list(final_names)
        if n > 1:
            index = {
                "metadata": {"total_size": total_size},
                "weight_map": {k: name for keys, name in zip(shards, final_names) for k in keys},
            }
            index_name = f"{single}.index.json"
            _write_json(index, staging / index_name)
            written.append(index_name)
        for name, content in (extra_files or {}).items():
            if isinstance(content, (str, os.PathLike)):
                shutil.copyfile(content, staging / name)
            else:
                _write_json(content, staging / name)
            written.append(name)
        if config is not None:
            _write_json(config, staging / CONFIG_NAME)
            written.append(CONFIG_NAME)
    return [out / name for name in written]


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    atomic: bool = True,
) -> None:
    """Write ``config.json`` (with ``torch_dtype`` and ``architectures``) and the weights as
    ``model.safetensors`` (or shards + ``model.safetensors.index.json`` above ``max_shard_size``;
    ``pytorch_model.bin`` when ``safe_serialization=False``), in a form transformers loads.

    A tied LM head is not written (it is the embedding matrix; transformers re-ties it).
    The files replace the folder's previous checkpoint at once (``atomic=False``: see
    :func:`write_checkpoint`).
    """
    sd = model.state_dict() if state_dict is None else state_dict
    config = model.config
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in sd:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise TypeError(f"state_dict values must be tensors; {not_tensors[:5]} are not")
    meta = [k for k, v in sd.items() if v.is_meta]
    if meta:
        raise ValueError(f"cannot save tensors on the meta device (they hold no values): {meta[:5]}")
    float_dtypes = [v.dtype for v in sd.values() if v.is_floating_point()]
    cfg = config.to_dict()
    cfg["torch_dtype"] = dtype_name(float_dtypes[0]) if float_dtypes else "float32"
    cfg["architectures"] = [type(model).__name__]
    cfg.setdefault("transformers_version", TRANSFORMERS_VERSION)  # the format we write; transformers reads it
    write_checkpoint(sd.items(), save_directory, cfg, max_shard_size=max_shard_size,
                     safe_serialization=safe_serialization, atomic=atomic)
