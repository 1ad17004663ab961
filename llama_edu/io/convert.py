"""Bringing other checkpoint formats into the Hugging Face layout.

1. Meta's original release (``params.json`` + ``consolidated.00.pth`` ... one file per
   model-parallel rank + ``tokenizer.model``), as ``transformers``'
   ``convert_llama_weights_to_hf.py`` does, with its known problems fixed:

   - the shard count comes from the files (``--model_size`` is only a cross-check);
   - grouped-query attention works at any shard count (the reference assumes
     ``n_heads == n_kv_heads ** 2``-style arithmetic per shard);
   - ``"vocab_size": -1`` is read from the weights;
   - Llama 2 gets ``max_position_embeddings`` 4096 (the reference writes 2048, transformers #28241),
     see :func:`guess_max_position_embeddings` for the rule;
   - the output dtype is a parameter (default float16) and peak memory stays near one output
     shard plus memory-mapped inputs (the reference holds the whole model in RAM twice).

   Llama 3.x checkpoints too: ``rope_theta`` 500,000, ``use_scaled_rope`` (Llama 3.1's "llama3"
   RoPE scaling, factor ``rope_scaling_factor`` or 8), a 128,256-token vocabulary with Meta's
   tiktoken ``tokenizer.model`` (copied, for :class:`~llama_edu.text.llama3.Llama3Tokenizer`), and no
   ``output.weight`` when the output layer is the embedding (tied, Llama 3.2 1B/3B).

2. llama2.c's ``model.bin`` exports (the legacy 7-int header and the version-1 "ak42" format).

Both keep q/k in Meta's *interleaved* rotary layout: Meta's code rotates pairs of neighbouring
dimensions (0, 1), (2, 3), ... as complex numbers, while HF's ``rotate_half`` pairs dimension i
with i + head_dim/2. Permuting the output rows of ``wq``/``wk`` inside every head turns one into
the other (:func:`permute_qk`); the same model, bit for bit. Forgetting it gives a model that
produces sensible text for a few tokens and then gibberish (llama2.c PR #286).

:func:`llama_edu.reference.reference_forward` runs Meta-layout weights through Meta's own math
(complex RoPE), so the conversion is checked against an independent implementation.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .atomic_save import check_output_folder, replace_folder_files
from .checkpoint import _skip_init, dtype_name, load_torch_state_dict, parse_dtype, write_checkpoint
from ..config import TRANSFORMERS_VERSION, LlamaConfig
from .files import cache_dir, find_data_file, read_json_object
from ..mlp import swiglu_hidden_size
from ..modeling import LlamaForCausalLM
from ..reference import reference_forward
from ..text.llama3 import Llama3Tokenizer

# ============================================================================================
# The q/k permutation
# ============================================================================================


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary layout -> HF's rotate_half layout.

    ``w`` is a q or k projection weight (n_heads * head_dim, in_features). Inside each head,
    Meta's rows are ordered (pair 0 real, pair 0 imag, pair 1 real, pair 1 imag, ...); HF wants
    (all reals, then all imags) so that dimension i pairs with i + head_dim/2.
    """
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk`: HF rotate_half layout -> Meta's interleaved layout."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


# ============================================================================================
# Meta's consolidated.NN.pth checkpoints
# ============================================================================================

#: Model-parallel shard counts of Meta's releases, used only to cross-check ``--model_size``.
NUM_SHARDS = {"7B": 1, "7Bf": 1, "13B": 2, "13Bf": 2, "30B": 4, "34B": 4, "65B": 8, "70B": 8, "70Bf": 8}

#: The dimension along which each Meta weight is split across model-parallel ranks
#: (fairscale's ColumnParallelLinear splits outputs = dim 0, RowParallelLinear inputs = dim 1,
#: ParallelEmbedding the embedding dim = dim 1); None = replicated on every rank.
META_SPLIT_DIM = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}

#: Meta name (per layer) -> HF name.
META_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def _split_dim(meta_key: str) -> int | None:
    suffix = re.sub(r"^layers\.\d+\.", "", meta_key)
    if suffix not in META_SPLIT_DIM:
        raise ValueError(f"unknown key {meta_key!r} in the Meta checkpoint (expected names like layers.0.attention.wq.weight)")
    return META_SPLIT_DIM[suffix]


def guess_max_position_embeddings(params: dict[str, Any], model_size: str | None = None) -> int:
    """The context length to write, since Meta's params.json does not say it.

    Rule: ``max_seq_len`` in params.json if present; Llama 3.1/3.2 (``use_scaled_rope``) 131072;
    Llama 3 (rope_theta 500000) 8192; Code Llama (rope_theta > 10000) 16384;
    Llama 1 (norm_eps 1e-6, as in every Llama 1 params.json) 2048; everything else, including
    Llama 2 (norm_eps 1e-5, and the ``*f`` chat sizes) 4096. Pass ``max_position_embeddings``
    explicitly to override.
    """
    if params.get("max_seq_len"):
        return int(params["max_seq_len"])
    if params.get("use_scaled_rope"):
        return 131072
    if float(params.get("rope_theta", 10000.0)) == 500000.0:
        return 8192
    if float(params.get("rope_theta", 10000.0)) > 10000.0:
        return 16384
    if model_size and model_size.endswith("f"):
        return 4096
    if math.isclose(float(params.get("norm_eps", 1e-5)), 1e-6):
        return 2048
    return 4096


def merge_meta_shards(shards: list[dict[str, torch.Tensor]], only: Callable[[str], bool] | None = None,
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(meta_key, full tensor) pairs from the model-parallel shards, one tensor at a time:
    split weights are concatenated along their split dimension, replicated ones taken from
    rank 0. Keys come in rank 0's order; ``only(key)`` picks some of them.

    Shards of two different models are refused: every rank holds the same replicated tensors
    (the RMSNorm weights), and the split ones agree in every dimension but the split one."""
    keys = [k for k in shards[0] if not k.endswith("rope.freqs")]  # Llama 1 kept a freqs buffer
    for i, s in enumerate(shards[1:], 1):
        if set(k for k in s if not k.endswith("rope.freqs")) != set(keys):
            raise ValueError(f"consolidated.{i:02d}.pth holds other keys than consolidated.00.pth; are they from the same model?")
    for key in keys:
        if only is not None and not only(key):
            continue
        dim = _split_dim(key)
        for i, s in enumerate(shards[1:], 1):
            a, b = shards[0][key], s[key]
            same_shape = a.dim() == b.dim() and all(x == y for d, (x, y) in enumerate(zip(a.shape, b.shape)) if d != dim)
            if not same_shape or a.dtype != b.dtype or (dim is None and not torch.equal(a, b)):
                what = f"is {tuple(b.shape)} {b.dtype} against {tuple(a.shape)} {a.dtype}" if not same_shape or a.dtype != b.dtype \
                    else "differs (every rank holds the same copy of it)"
                raise ValueError(
                    f"{key} of consolidated.{i:02d}.pth {what} in consolidated.00.pth: the shards come from "
                    "two different models; put the consolidated.*.pth files of one download in the folder"
                )
        if dim is None or len(shards) == 1:
            yield key, shards[0][key]
        else:
            yield key, torch.cat([s[key] for s in shards], dim=dim)


def merged_meta_state_dict(input_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All of a Meta checkpoint as one unsharded state dict with Meta's key names, and its
    params.json. For small models (tests, the notebook): it holds the whole model in memory."""
    params, files = _read_meta_dir(Path(input_dir))
    shards = [load_torch_state_dict(f) for f in files]
    return {k: v.clone() for k, v in merge_meta_shards(shards)}, params


def _read_meta_dir(input_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir} is not a folder; pass the folder holding params.json and consolidated.*.pth")
    pfile = input_dir / "params.json"
    if not pfile.is_file():
        raise FileNotFoundError(f"params.json is missing from {input_dir}; pass the folder of one model size (e.g. llama-2-7b/)")
    params = read_json_object(pfile, "it should be Meta's params.json")
    params = params.get("model", params)
    files = sorted(input_dir.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"no consolidated.*.pth files in {input_dir}")
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(files))]
    if [f.name for f in files] != expected:
        raise FileNotFoundError(f"the shards in {input_dir} are {[f.name for f in files]}, expected {expected}: one is missing")
    for k in ("dim", "n_layers", "n_heads"):
        if k not in params:
            raise ValueError(f"{pfile} has no {k!r}; is it a Meta Llama params.json?")
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"):
        v = params.get(k)
        if (k in ("n_kv_heads", "multiple_of") and v is None) or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            continue
        raise ValueError(f"{pfile}: {k!r} must be a positive integer, got {v!r}; fix params.json")
    if params["dim"] % params["n_heads"] or params["n_heads"] % (params.get("n_kv_heads") or params["n_heads"]):
        raise ValueError(
            f"{pfile}: dim={params['dim']}, n_heads={params['n_heads']}, n_kv_heads={params.get('n_kv_heads')} do not fit: "
            "dim must be a multiple of n_heads and n_heads a multiple of n_kv_heads; fix params.json"
        )
    return params, files


def _check_meta_weights(params: dict[str, Any], shards: list[dict[str, torch.Tensor]], files: list[Path],
                        vocab_size: int, intermediate: int) -> None:
    """Compare params.json with the weights' keys and shapes (read from the memory-mapped
    files' headers, nothing else) and raise one ``ValueError`` listing every disagreement,
    before anything is written."""
    dim, n_heads, n_layers = params["dim"], params["n_heads"], params["n_layers"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim, num_shards = dim // n_heads, len(shards)
    per_layer = {
        "attention.wq.weight": (n_heads * head_dim, dim), "attention.wk.weight": (n_kv * head_dim, dim),
        "attention.wv.weight": (n_kv * head_dim, dim), "attention.wo.weight": (dim, n_heads * head_dim),
        "feed_forward.w1.weight": (intermediate, dim), "feed_forward.w2.weight": (dim, intermediate),
        "feed_forward.w3.weight": (intermediate, dim), "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,),
    }
    expected = {"tok_embeddings.weight": (vocab_size, dim), "norm.weight": (dim,), "output.weight": (vocab_size, dim)}
    if "output.weight" not in shards[0]:  # the output layer is the embedding (tied)
        del expected["output.weight"]
    for i in range(n_layers):
        expected.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    keys = [k for k in shards[0] if not k.endswith("rope.freqs")]
    problems = []
    unknown = [k for k in keys if re.sub(r"^layers\.\d+\.", "", k) not in META_SPLIT_DIM]
    if unknown:
        problems.append(f"unknown keys {unknown[:5]} (expected names like layers.0.attention.wq.weight)")
    layers = sorted({int(m.group(1)) for k in keys for m in [re.match(r"layers\.(\d+)\.", k)] if m})
    if layers and layers[-1] + 1 != n_layers:
        problems.append(f"params.json says n_layers={n_layers} but the weights have {layers[-1] + 1} layers")
    missing = [k for k in expected if k not in shards[0]]
    if missing and not (layers and layers[-1] + 1 < n_layers and all(k.startswith("layers.") for k in missing)
                        and all(int(k.split(".")[1]) > layers[-1] for k in missing)):
        problems.append(f"the weights lack {len(missing)} tensor(s): {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    bad = []
    for key in keys:
        if key not in expected:
            continue
        dim_split = _split_dim(key)
        shape = list(shards[0][key].shape)
        if dim_split is not None:
            shape[dim_split] *= num_shards
        if tuple(shape) != expected[key]:
            bad.append(f"{key} is {tuple(shape)}, expected {expected[key]}")
    if bad:
        problems.append(
            f"shapes do not fit dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv}, feed-forward {intermediate}: "
            + "; ".join(bad[:4]) + (f" (and {len(bad) - 4} more)" if len(bad) > 4 else "")
        )
    freqs = next((t for k, t in shards[0].items() if k.endswith("rope.freqs")), None)
    if freqs is not None and freqs.shape[0] * 2 != head_dim:  # Llama 1's buffer reveals the head size
        problems.append(
            f"params.json gives head_dim dim/n_heads = {head_dim} but rope.freqs is for head_dim {freqs.shape[0] * 2} "
            f"(n_heads={dim // (freqs.shape[0] * 2)}?)"
        )
    if problems:
        raise ValueError(
            f"params.json in {files[0].parent} does not belong to these weights, nothing was written: "
            + "; ".join(problems) + ". Use the params.json that came with the consolidated.*.pth files"
        )


def _meta_config(params: dict[str, Any], shard0: dict[str, torch.Tensor], num_shards: int,
                 vocab_size: int, max_position_embeddings: int, bos: int, eos: int, tied: bool = False) -> LlamaConfig:
    """The LlamaConfig a Meta params.json (and the weights' shapes) describes; ``tied``: the
    checkpoint has no output.weight, its embedding is the output layer."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads
    w1 = shard0.get("layers.0.feed_forward.w1.weight")
    intermediate = w1.shape[0] * num_shards if w1 is not None else None
    from_params = swiglu_hidden_size(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
    if intermediate is not None and intermediate != from_params:
        raise ValueError(
            f"params.json gives a feed-forward size of {from_params} (dim {dim}, multiple_of "
            f"{params.get('multiple_of', 256)}, ffn_dim_multiplier {params.get('ffn_dim_multiplier')}) but the "
            f"weights have {intermediate}: params.json does not belong to these weights"
        )
    wk = shard0.get("layers.0.attention.wk.weight")
    if wk is not None and wk.shape[0] * num_shards != n_kv * head_dim:
        raise ValueError(
            f"params.json says n_kv_heads={n_kv} (x head_dim {head_dim}) but wk has "
            f"{wk.shape[0]} rows in each of {num_shards} shard(s)"
        )
    try:
        return _llama_config(vocab_size, dim, from_params, params, n_heads, n_kv, max_position_embeddings, bos, eos, tied)
    except ValueError as e:
        raise ValueError(f"params.json (with the options given) describes a model that cannot work: {e}") from None


def _llama_config(vocab_size, dim, from_params, params, n_heads, n_kv, max_position_embeddings, bos, eos, tied) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=from_params,
        num_hidden_layers=params["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        rope_scaling=meta_rope_scaling(params),
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=tied,
    )


def meta_rope_scaling(params: dict[str, Any]) -> dict[str, Any] | None:
    """Llama 3.1's ``use_scaled_rope`` as the config's llama3 ``rope_scaling`` (Meta's code fixes
    low_freq_factor 1 and the original context 8192; factor and high_freq_factor default to 8 and 4)."""
    if not params.get("use_scaled_rope"):
        return None
    return {"type": "llama3", "factor": float(params.get("rope_scaling_factor") or 8.0), "low_freq_factor": 1.0,
            "high_freq_factor": float(params.get("rope_high_freq_factor") or 4.0),
            "original_max_position_embeddings": 8192}  # fmt: skip


def _find_tokenizer(input_dir: Path, tokenizer_path: str | os.PathLike | None) -> Path | None:
    if tokenizer_path is not None:
        p = Path(tokenizer_path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer {p} does not exist")
        return p
    # Meta's download puts tokenizer.model next to the size folders (llama-2-7b/../tokenizer.model).
    for p in (input_dir / "tokenizer.model", input_dir.parent / "tokenizer.model"):
        if p.is_file():
            return p
    return None


def is_tiktoken_file(path: Path) -> bool:
    """Meta's Llama 3 tokenizer.model is text ('base64 rank' lines); Llama 2's is a SentencePiece
    protobuf (binary, starting with field 1 = byte 0x0a)."""
    with open(path, "rb") as f:
        head = f.read(64)
    return bool(head) and head[:1] != b"\n" and b"\x00" not in head


def llama3_tokenizer_files(tokenizer_model: Path, tok: Llama3Tokenizer, max_position_embeddings: int) -> dict[str, Any]:
    """The tokenizer files for Meta's Llama 3 tiktoken file: the file itself, copied, plus the
    ``tokenizer_config.json`` and ``special_tokens_map.json`` that ``tok`` (loaded from it) writes."""
    tok.model_max_length = max_position_embeddings
    return {"tokenizer.model": tokenizer_model, "tokenizer_config.json": tok._config(),
            "special_tokens_map.json": tok.special_tokens_map}


def tokenizer_files(tokenizer_model: Path, max_position_embeddings: int) -> dict[str, Any]:
    """The HF tokenizer files for a SentencePiece model: the model itself, copied, plus a
    ``tokenizer_config.json`` and ``special_tokens_map.json`` that ``LlamaTokenizer`` reads."""
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return {
        "tokenizer.model": tokenizer_model,
        "tokenizer_config.json": {
            **special,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "legacy": False,
            "model_max_length": max_position_embeddings,
            "pad_token": None,
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
        },
        "special_tokens_map.json": special,
    }


def meta_to_hf(key: str, t: torch.Tensor, n_heads: int, n_kv: int, n_layers: int) -> tuple[str, torch.Tensor]:
    """One merged Meta tensor -> its HF name and layout (q/k rows permuted to rotate_half)."""
    if key == "tok_embeddings.weight":
        return "model.embed_tokens.weight", t
    if key == "norm.weight":
        return "model.norm.weight", t
    if key == "output.weight":
        return "lm_head.weight", t
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    layer, suffix = int(m.group(1)), m.group(2)
    if layer >= n_layers:
        raise ValueError(f"{key} is beyond n_layers={n_layers} of params.json")
    if suffix == "attention.wq.weight":
        t = permute_qk(t, n_heads)
    elif suffix == "attention.wk.weight":
        t = permute_qk(t, n_kv)
    return f"model.layers.{layer}.{META_TO_HF[suffix]}", t


#: (dim, n_layers) -> n_heads of every Meta release (Llama 1, 2, Code Llama, 3.x): a params.json
#: with one of these shapes and another head count does not belong to the weights. The weights
#: alone cannot tell (any head count that divides the shapes gives a working, different model).
META_RELEASE_HEADS = {(4096, 32): 32, (5120, 40): 40, (6656, 60): 52, (8192, 80): 64, (8192, 48): 64,
                      (2048, 16): 32, (3072, 28): 24, (16384, 126): 128}

#: Largest |logit difference| the conversion check accepts, relative to the logits' scale.
REFERENCE_RTOL = 1e-4


def check_against_reference(shards: list[dict[str, torch.Tensor]], params: dict[str, Any], config: LlamaConfig,
                            n_tokens: int = 8) -> float:
    """Before writing a conversion: run the first and last layers (with the embeddings, the final
    norm and the head) of both the Meta weights, through :func:`llama_edu.reference.reference_forward`
    (Meta's own math, interleaved q/k, complex RoPE), and of the converted HF tensors, through
    our model, on ``n_tokens`` tokens, in float32. Two layers keep it cheap for a 70B model and
    still exercise every tensor kind the conversion touches. Raises ``ValueError`` (nothing is
    written) when the logits differ; returns the largest relative difference."""
    dim, n_heads, n_layers = params["dim"], params["n_heads"], params["n_layers"]
    release = META_RELEASE_HEADS.get((dim, n_layers))
    if release is not None and release != n_heads:
        raise ValueError(
            f"params.json says n_heads={n_heads}, but every Meta release with dim={dim} and {n_layers} layers "
            f"has n_heads={release}: nothing was written; use the params.json that came with the weights"
        )
    n_kv = params.get("n_kv_heads") or n_heads
    keep = sorted({0, n_layers - 1})
    renumber = {str(layer): str(j) for j, layer in enumerate(keep)}
    meta: dict[str, torch.Tensor] = {}
    for key, t in merge_meta_shards(shards, only=lambda k: not k.startswith("layers.") or k.split(".")[1] in renumber):
        if key.startswith("layers."):
            _, layer, rest = key.split(".", 2)
            key = f"layers.{renumber[layer]}.{rest}"
        meta[key] = t.float()
    small = {**params, "n_layers": len(keep)}
    hf = dict(meta_to_hf(k, t, n_heads, n_kv, len(keep)) for k, t in meta.items())
    cfg = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": len(keep), "torch_dtype": "float32"})
    with torch.device("meta"), _skip_init(LlamaForCausalLM):  # no memory: the tensors above are assigned
        model = LlamaForCausalLM(cfg).eval()
    if cfg.tie_word_embeddings:  # Llama 3.2's small models: no output.weight, the head is the embedding
        hf.setdefault("lm_head.weight", hf["model.embed_tokens.weight"])
    model.load_state_dict(hf, strict=True, assign=True)
    vocab = cfg.vocab_size
    tokens = torch.tensor([[min(cfg.bos_token_id or 1, vocab - 1)] + [(i * 7919) % vocab for i in range(1, n_tokens)]])
    with torch.no_grad():
        ref = reference_forward(meta, small, tokens)
        ours = model(tokens).logits.float()
    scale = max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item() / scale
    if not diff <= REFERENCE_RTOL:  # also catches NaN
        raise ValueError(
            f"the converted model's logits differ from Meta's reference forward by {diff:.3g} (relative; at most "
            f"{REFERENCE_RTOL:g} allowed) on {n_tokens} tokens through layers {keep}: nothing was written. The "
            "conversion does not reproduce these weights: check params.json (n_heads, n_kv_heads, norm_eps, rope_theta)"
        )
    return diff


def convert_meta_checkpoint(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_size: str | None = None,
    dtype: str | torch.dtype = torch.float16,
    max_shard_size: int | str = "5GB",
    max_position_embeddings: int | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    safe_serialization: bool = True,
) -> LlamaConfig:
    """Convert Meta's ``params.json`` + ``consolidated.NN.pth`` (+ ``tokenizer.model``) in
    ``input_dir`` into an HF-layout folder ``output_dir`` (config.json, generation_config.json,
    safetensors shards + index, tokenizer files). Returns the written config.

    The number of model-parallel shards is read from the files; ``model_size`` ("7B", "70B", ...)
    only cross-checks it. ``dtype`` is the output dtype (default float16, as the reference).
    """
    input_dir = Path(input_dir)
    check_output_folder(output_dir, [input_dir, tokenizer_path], overwrite=True)
    params, files = _read_meta_dir(input_dir)
    num_shards = len(files)
    if model_size is not None:
        if model_size not in NUM_SHARDS:
            raise ValueError(f"unknown model_size {model_size!r}; use one of {sorted(NUM_SHARDS)} or leave it out")
        if NUM_SHARDS[model_size] != num_shards:
            warnings.warn(
                f"model_size {model_size} is released as {NUM_SHARDS[model_size]} shard(s) but {input_dir} holds "
                f"{num_shards}; converting the {num_shards} found", stacklevel=2)
    out_dtype = parse_dtype(dtype)
    if out_dtype == "auto":
        raise ValueError("dtype must be a concrete dtype for conversion (float16, bfloat16 or float32)")

    shards = [load_torch_state_dict(f) for f in files]  # memory-mapped: nothing is read yet
    shard0 = shards[0]
    n_heads, n_layers = params["n_heads"], params["n_layers"]
    n_kv = params.get("n_kv_heads") or n_heads

    if "tok_embeddings.weight" not in shard0:
        raise ValueError(f"{files[0]} has no tok_embeddings.weight; is it a Meta Llama checkpoint?")
    emb = shard0["tok_embeddings.weight"]
    vocab_size = emb.shape[0]  # embeddings are split along dim 1, so rank 0 has every row
    if params.get("vocab_size", -1) > 0 and params["vocab_size"] != vocab_size:
        raise ValueError(f"params.json says vocab_size={params['vocab_size']} but tok_embeddings has {vocab_size} rows")
    if emb.shape[1] * num_shards != params["dim"]:
        raise ValueError(f"params.json says dim={params['dim']} but tok_embeddings is {emb.shape[1]} wide in each of {num_shards} shard(s)")

    w1 = shard0.get("layers.0.feed_forward.w1.weight")
    intermediate = w1.shape[0] * num_shards if w1 is not None else swiglu_hidden_size(
        params["dim"], params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
    _check_meta_weights(params, shards, files, vocab_size, intermediate)

    tok = _find_tokenizer(input_dir, tokenizer_path)
    llama3_tok = Llama3Tokenizer(tok) if tok is not None and is_tiktoken_file(tok) else None
    bos, eos = (128000, 128001) if llama3_tok is not None or vocab_size == 128256 else (1, 2)
    if llama3_tok is not None:
        if len(llama3_tok) != vocab_size:
            warnings.warn(f"the tokenizer has {len(llama3_tok)} tokens but the embedding {vocab_size} rows", stacklevel=2)
    elif tok is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tok))
        bos, eos = sp.bos_id(), sp.eos_id()
        if sp.vocab_size() != vocab_size:
            warnings.warn(f"the tokenizer has {sp.vocab_size()} pieces but the embedding {vocab_size} rows", stacklevel=2)
    max_pos = max_position_embeddings if max_position_embeddings is not None else guess_max_position_embeddings(params, model_size)
    tied = "output.weight" not in shard0
    config = _meta_config(params, shard0, num_shards, vocab_size, max_pos, bos, eos, tied)

    check_against_reference(shards, params, config)  # before anything is written

    def hf_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, t in merge_meta_shards(shards):
            name, t = meta_to_hf(key, t, n_heads, n_kv, n_layers)
            yield name, t.to(out_dtype)

    config.torch_dtype = dtype_name(out_dtype)
    cfg = config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["transformers_version"] = TRANSFORMERS_VERSION
    extra: dict[str, Any] = {
        "generation_config.json": {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos,
                                   "transformers_version": TRANSFORMERS_VERSION},
    }
    if tok is not None:
        extra.update(tokenizer_files(tok, max_pos) if llama3_tok is None else llama3_tokenizer_files(tok, llama3_tok, max_pos))
    keys_written: list[str] = []

    def counted():
        for k, t in hf_tensors():
            keys_written.append(k)
            yield k, t

    write_checkpoint(counted(), output_dir, cfg, max_shard_size=max_shard_size,
                     safe_serialization=safe_serialization, extra_files=extra)
    expected_n = 2 + 9 * n_layers + (0 if tied else 1)
    if len(keys_written) != expected_n:
        warnings.warn(f"wrote {len(keys_written)} tensors, expected {expected_n} for {n_layers} layers", stacklevel=2)
    return config


def hf_to_meta_state_dicts(state_dict: dict[str, torch.Tensor], config: LlamaConfig, num_shards: int = 1) -> list[dict[str, torch.Tensor]]:
    """The inverse conversion: an HF-layout causal-LM state dict -> Meta's per-rank state dicts
    (``consolidated.NN.pth`` contents). Used to build test checkpoints and in notebook 07."""
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    meta: dict[str, torch.Tensor] = {}
    hf_to_meta = {v: k for k, v in META_TO_HF.items()}
    lm_head = state_dict.get("lm_head.weight", state_dict["model.embed_tokens.weight"])
    for key, t in state_dict.items():
        if key == "model.embed_tokens.weight":
            meta["tok_embeddings.weight"] = t
        elif key == "model.norm.weight":
            meta["norm.weight"] = t
        elif key == "lm_head.weight":
            continue
        else:
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
            suffix = hf_to_meta[m.group(2)]
            if suffix == "attention.wq.weight":
                t = unpermute_qk(t, n_heads)
            elif suffix == "attention.wk.weight":
                t = unpermute_qk(t, n_kv)
            meta[f"layers.{m.group(1)}.{suffix}"] = t
    meta["output.weight"] = lm_head
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for key, t in meta.items():
        dim = _split_dim(key)
        pieces = [t] * num_shards if dim is None else t.chunk(num_shards, dim=dim)
        if dim is not None and t.shape[dim] % num_shards:
            raise ValueError(f"{key} of shape {tuple(t.shape)} does not split into {num_shards} equal shards")
        for s, piece in zip(shards, pieces):
            s[key] = piece.clone().contiguous()
    return shards


def meta_params(config: LlamaConfig) -> dict[str, Any]:
    """A Meta params.json for a config whose intermediate_size follows Meta's formula with
    multiple_of (searched) — used to write synthetic Meta checkpoints."""
    params: dict[str, Any] = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers,
                              "n_heads": config.num_attention_heads, "norm_eps": config.rms_norm_eps, "vocab_size": -1}
    if config.num_key_value_heads != config.num_attention_heads:
        params["n_kv_heads"] = config.num_key_value_heads
    if config.rope_theta != 10000.0:
        params["rope_theta"] = config.rope_theta
    rs = config.rope_scaling
    if rs is not None:
        if rs["type"] != "llama3" or rs["low_freq_factor"] != 1.0 or rs["original_max_position_embeddings"] != 8192:
            raise ValueError(f"Meta's params.json can only express llama3 RoPE scaling with low_freq_factor 1 and an 8192 original context, not {rs}")
        params.update(use_scaled_rope=True, rope_scaling_factor=rs["factor"], rope_high_freq_factor=rs["high_freq_factor"])
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if swiglu_hidden_size(config.hidden_size, multiple_of) == config.intermediate_size:
            params["multiple_of"] = multiple_of
            return params
    # Fall back to ffn_dim_multiplier with multiple_of 1.
    base = int(2 * 4 * config.hidden_size / 3)
    params["multiple_of"] = 1
    params["ffn_dim_multiplier"] = config.intermediate_size / base
    if swiglu_hidden_size(config.hidden_size, 1, params["ffn_dim_multiplier"]) != config.intermediate_size:
        params["ffn_dim_multiplier"] = (config.intermediate_size + 0.5) / base
    return params


def write_meta_checkpoint(model: torch.nn.Module, output_dir: str | os.PathLike, num_shards: int = 1) -> Path:
    """Write an HF-layout LlamaForCausalLM as Meta's release format (params.json +
    consolidated.NN.pth), e.g. to try :func:`convert_meta_checkpoint` on a small model."""
    out = Path(output_dir)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def owned(name: str) -> bool:  # an earlier export's files, whatever its shard count
        return name == "params.json" or re.fullmatch(r"consolidated\.\d+\.pth", name) is not None

    with replace_folder_files(out, owned, last="params.json") as staging:
        for i, shard in enumerate(hf_to_meta_state_dicts(sd, model.config, num_shards)):
            torch.save(shard, staging / f"consolidated.{i:02d}.pth")
        (staging / "params.json").write_text(json.dumps(meta_params(model.config)))
    return out


# ============================================================================================
# llama2.c model.bin
# ============================================================================================

LLAMA2C_MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
_HEADER = struct.Struct("<7i")


def _llama2c_layout(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, version, shared):
    """[(name, shape)] in file order for llama2.c's legacy (version 0) and version-1 exports."""
    head_dim = dim // n_heads
    kv_dim = n_kv * head_dim
    per_layer = {
        "rms_att": (dim,), "rms_ffn": (dim,),
        "wq": (dim, dim), "wk": (kv_dim, dim), "wv": (kv_dim, dim), "wo": (dim, dim),
        "w1": (hidden, dim), "w2": (dim, hidden), "w3": (hidden, dim),
    }

    def layers(name):
        return [(f"{name}.{i}", per_layer[name]) for i in range(n_layers)]

    if version == 0:
        order = [("tok_embeddings", (vocab, dim))]
        for name in ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3"):
            order += layers(name)
        order += [("rms_final", (dim,)), ("freq_cis_real", (seq_len, head_dim // 2)),
                  ("freq_cis_imag", (seq_len, head_dim // 2))]
    else:
        order = layers("rms_att") + layers("rms_ffn") + [("rms_final", (dim,)), ("tok_embeddings", (vocab, dim))]
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            order += layers(name)
    if not shared:
        order.append(("wcls", (vocab, dim)))
    return order


def read_llama2c(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Parse a llama2.c ``model.bin`` (legacy or version 1, float32) into an HF config and an HF
    state dict (q/k permuted to the rotate_half layout)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(256)
    if len(head) < 28:
        raise ValueError(f"{path} is {size} bytes, too short for a llama2.c checkpoint header")
    (magic,) = struct.unpack("<I", head[:4])
    if magic == LLAMA2C_MAGIC:
        (version,) = struct.unpack("<i", head[4:8])
        if version != 1:
            raise ValueError(
                f"{path} is llama2.c export version {version}; only version 1 (float32) and the legacy format "
                "are supported (version 2 is int8-quantized: re-export with `python export.py --version 1`)")
        if len(head) < 256:
            raise ValueError(f"{path} is truncated: the version-1 header is 256 bytes, the file {size}")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = _HEADER.unpack(head[8:36])
        shared = bool(head[36])
        offset = 256
    else:
        version = 0
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = _HEADER.unpack(head[:28])
        shared = vocab > 0  # the legacy format marks an unshared classifier by a negative vocab_size
        vocab = abs(vocab)
        offset = 28
    fields = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab, seq_len=seq_len)
    if min(fields.values()) < 1 or dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2 or max(fields.values()) > 10**7:
        raise ValueError(
            f"{path} is not a llama2.c checkpoint: no 'ak42' magic and the legacy header reads {fields}, "
            "which is not a valid model shape")
    layout = _llama2c_layout(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, version, shared)
    n_floats = sum(math.prod(s) for _, s in layout)
    if size != offset + 4 * n_floats:
        hint = ""
        if version == 0 and size == offset + 4 * (n_floats + vocab * dim):
            hint = " (the size fits an unshared classifier: is vocab_size's sign wrong?)"
        raise ValueError(
            f"{path} has {size} bytes but a llama2.c {'version-1' if version else 'legacy'} checkpoint with {fields} "
            f"{'and a shared' if shared else 'and an unshared'} classifier has {offset + 4 * n_floats}: "
            f"it is truncated or not what its header says{hint}")
    data = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=offset).copy())
    raw: dict[str, torch.Tensor] = {}
    pos = 0
    for name, shape in layout:
        n = math.prod(shape)
        raw[name] = data[pos:pos + n].view(shape)
        pos += n

    if version == 0:  # the legacy file stores RoPE's cos table: check it is the usual base 10000
        head_dim = dim // n_heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        expected_cos = torch.cos(torch.outer(torch.arange(seq_len).float(), inv))
        if not torch.allclose(raw["freq_cis_real"], expected_cos, atol=1e-4):
            warnings.warn(f"{path}'s rotary table is not RoPE with base 10000; the converted model assumes rope_theta=10000",
                          stacklevel=2)

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=seq_len,
        rms_norm_eps=1e-5, tie_word_embeddings=shared, torch_dtype="float32",
    )
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": raw["tok_embeddings"]}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = permute_qk(raw[f"wq.{i}"], n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute_qk(raw[f"wk.{i}"], n_kv)
        sd[p + "self_attn.v_proj.weight"] = raw[f"wv.{i}"]
        sd[p + "self_attn.o_proj.weight"] = raw[f"wo.{i}"]
        sd[p + "mlp.gate_proj.weight"] = raw[f"w1.{i}"]
        sd[p + "mlp.down_proj.weight"] = raw[f"w2.{i}"]
        sd[p + "mlp.up_proj.weight"] = raw[f"w3.{i}"]
        sd[p + "input_layernorm.weight"] = raw[f"rms_att.{i}"]
        sd[p + "post_attention_layernorm.weight"] = raw[f"rms_ffn.{i}"]
    sd["model.norm.weight"] = raw["rms_final"]
    if not shared:
        sd["lm_head.weight"] = raw["wcls"]
    return config, {k: v.contiguous() for k, v in sd.items()}


def load_llama2c(path: str | os.PathLike, device: str | torch.device | None = None) -> LlamaForCausalLM:
    """A llama2.c ``model.bin`` as a ready LlamaForCausalLM (float32, eval mode)."""
    config, sd = read_llama2c(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(sd, strict=not config.tie_word_embeddings, assign=True)
    model.tie_weights()
    return model.to(device or "cpu").eval()


def convert_llama2c_checkpoint(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str | torch.dtype = torch.float32,
    max_shard_size: int | str = "5GB",
    tokenizer_path: str | os.PathLike | None = None,
) -> LlamaConfig:
    """Convert a llama2.c ``model.bin`` into an HF-layout folder (float32 by default: the file
    is float32). ``tokenizer_path`` optionally adds a SentencePiece ``tokenizer.model``
    (llama2.c's own ``tokenizer.bin`` is a different format and is not converted)."""
    check_output_folder(output_dir, [path, tokenizer_path], overwrite=True)
    config, sd = read_llama2c(path)
    out_dtype = parse_dtype(dtype)
    if out_dtype == "auto":
        out_dtype = torch.float32
    config.torch_dtype = dtype_name(out_dtype)
    cfg = config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["transformers_version"] = TRANSFORMERS_VERSION
    extra: dict[str, Any] = {"generation_config.json": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                                                        "transformers_version": TRANSFORMERS_VERSION}}
    if tokenizer_path is not None:
        if not Path(tokenizer_path).is_file():
            raise FileNotFoundError(f"tokenizer {tokenizer_path} does not exist")
        extra.update(tokenizer_files(Path(tokenizer_path), config.max_position_embeddings))
    write_checkpoint(((k, v.to(out_dtype)) for k, v in sd.items()), output_dir, cfg,
                     max_shard_size=max_shard_size, extra_files=extra)
    return config


def stories260k_hf(download: bool = True) -> Path:
    """The folder of stories260K in the HF layout: the shared copy when there is one (tests, CI),
    else made once in the user cache from llama2.c's ``stories260K.bin`` (found or downloaded)
    with :func:`convert_llama2c_checkpoint`: the same weights (Colab, fresh clones)."""
    try:
        return find_data_file("stories260K/hf", download=False)
    except FileNotFoundError:
        target = cache_dir() / "stories260K" / "hf"
        if not (target / "config.json").is_file():
            convert_llama2c_checkpoint(find_data_file("stories260K/stories260K.bin", download=download), target)
        return target
