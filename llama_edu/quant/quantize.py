"""Weight-only quantization written out: int8, int4 and NF4 linear layers.

A decoder spends almost all its bytes, and (when decoding one token at a time) almost all its
time, reading the weight matrices of its linear layers. Storing them in fewer bits shrinks the
model and the bytes read per token; the weights are turned back into floats ("dequantized")
right before each matrix product. Three formats, from the simplest to QLoRA's:

* ``"int8"`` — absmax, one scale per output channel (the weight-only part of LLM.int8(),
  Dettmers et al. 2022, eq. 1)::

      s_r = max_j |W[r, j]| / 127        q[r, j] = round(W[r, j] / s_r) in [-127, 127]
      W_hat[r, j] = s_r * q[r, j]

* ``"int4"`` — asymmetric (min-max) round-to-nearest over groups of ``group_size`` input
  columns, codes in [0, 15], two codes per byte (the "RTN" baseline of the GPTQ paper)::

      s = (max(w) - min(w)) / (2^b - 1)   z = round(-min(w) / s)
      q = clamp(round(w / s) + z, 0, 2^b - 1)        w_hat = s * (q - z)

* ``"nf4"`` — NormalFloat4 with double quantization, as QLoRA defines it (Dettmers et al. 2023,
  section 3, eq. 4-6): the flattened weight is cut into blocks of 64; each block is divided by
  its absmax c2 and every value is replaced by the nearest of 16 NF4 values (quantiles of
  N(0, 1) scaled to [-1, 1]). The block scales c2 are themselves quantized: their mean is
  subtracted and they are stored as 8-bit "dynamic" floats in blocks of 256, each block with an
  fp32 scale c1 (double quantization, eq. 6)::

      W_hat = doubleDequant(c1, c2_8bit, W_nf4) = NF4[W_nf4] * (dequant(c1, c2_8bit) + mean(c2))

  The bytes are laid out as bitsandbytes lays them out (first value in the high nibble), and a
  test checks that they equal ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")``.

:func:`quantize` swaps a model's ``nn.Linear`` layers (not the embeddings, not the LM head unless
asked) in place for :class:`Int8Linear`, :class:`IntLinear` or :class:`NF4Linear`. They keep
``in_features``/``out_features`` and hold the packed weights as buffers, so ``state_dict``,
``save_pretrained`` and ``.to(device)`` work as for any module; the scheme goes into
``config.quantization_config`` so ``from_pretrained`` rebuilds the quantized model.
GPTQ (:mod:`llama_edu.gptq`) chooses the codes more cleverly and stores them as :class:`IntLinear`.

Each layer's ``forward`` has two paths. The *reference* path is the one to read: dequantize the
whole weight to floats, then an ordinary matrix product. It is exact but slow, because it writes
and re-reads a float copy of the weight on every call. Where PyTorch has a fused kernel for the
device and dtype (int8 and int4, see "Packed kernels" below), the layer calls it instead: the
kernel reads the packed bytes and multiplies in one pass, and a test checks that both paths agree.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..generation.decode import tensor_key

SCHEMES = ("int8", "int4", "nf4")
#: What ``quant_method`` says in a config.json this module wrote.
QUANT_METHOD = "llama_edu"
#: Linear layers that are task heads, left in full precision unless asked.
HEAD_NAMES = ("lm_head", "score")
#: Bit widths the group-wise integer format packs (2, 3, 4 and 8 bits per code).
INT_BITS = (2, 3, 4, 8)

# The 16 NF4 values, as printed in QLoRA's appendix E and bitsandbytes' kernels (float32).
# They are the formula of :func:`normal_float_codebook`, rounded to float32: storing the table
# rather than recomputing it keeps the codes bit-identical to bitsandbytes'.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip


def normal_float_codebook(bits: int = 4, offset: float = 1 - 0.5 * (1 / 30 + 1 / 32)) -> torch.Tensor:
    """The NormalFloat codebook of QLoRA (section 3, "4-bit NormalFloat Quantization").

    2^(b-1) quantiles of N(0, 1) for the positive half, 2^(b-1) - 1 for the negative half and an
    exact zero, all divided by the largest so they span [-1, 1]. The quantiles are taken at
    evenly spaced probabilities between ``offset`` and 1/2 (``offset`` = 1 - (1/30 + 1/32) / 2,
    the paper's choice, keeps the outermost quantile finite). Returns (2^b,) float64, sorted.
    """
    half = 2 ** (bits - 1)
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    return values / values.max()


def dynamic_code_8bit() -> torch.Tensor:
    """The 8-bit "dynamic tree" float of Dettmers (2016, "8-Bit Approximations for Parallelism
    in Deep Learning"), which QLoRA uses for the second quantization of the block scales.

    A sign, a decimal exponent 10^-6 .. 10^0, and a linear fraction in [0.1, 1] that gets one
    more bit each time the exponent grows (so small numbers get range, large ones precision);
    plus 0 and 1. Returns (256,) float32, sorted.
    """
    values = [0.0, 1.0]
    for i in range(7):  # exponent 10^(i - 6), 2^i fraction values (midpoints of 2^i bins)
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2
        values += (10 ** (i - 6) * mids).tolist() + (-(10 ** (i - 6)) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code_8bit()


# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes (any shape, values < 2^bits) into a flat uint8 tensor,
    most significant bit first: for 4 bits, byte = (first << 4) | second, as bitsandbytes packs.
    The number of bits in total, ``codes.numel() * bits``, must be a multiple of 8."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if bits == 4:
        return (flat[0::2] << 4) | flat[1::2]
    if (flat.numel() * bits) % 8:
        raise ValueError(f"{flat.numel()} codes of {bits} bits do not fill whole bytes")
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.uint8, device=flat.device)
    bitstream = ((flat[:, None] >> shifts) & 1).reshape(-1, 8)  # (n_bytes, 8), MSB first
    return (bitstream << torch.arange(7, -1, -1, dtype=torch.uint8, device=flat.device)).sum(1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes, (n,) uint8."""
    if bits == 8:
        return packed[:n]
    if bits == 4:
        return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]
    bitstream = (packed[:, None] >> torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)) & 1
    groups = bitstream.reshape(-1)[: n * bits].reshape(n, bits)  # (n, bits), MSB first
    return (groups << torch.arange(bits - 1, -1, -1, dtype=torch.uint8, device=packed.device)).sum(1, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# int8: absmax per output channel
# ---------------------------------------------------------------------------------------------
def absmax_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> codes (out, in) int8 in [-127, 127] and scales (out,) float32, one per
    row (output channel): s = max|row| / 127, q = round(w / s). An all-zero row gets s = 1."""
    w = w.float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes (out, in) int8, scales (out,) -> weights (out, in) float32."""
    return q.float() * scale[:, None]


# ---------------------------------------------------------------------------------------------
# int4 (any bits): asymmetric min-max groups, shared with GPTQ
# ---------------------------------------------------------------------------------------------
def minmax_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of asymmetric round-to-nearest for each row of ``w`` (rows, cols):
    the range [min, max] of the row, widened to include 0 so that 0 is exact, split into
    2^bits - 1 steps. Scales are rounded to float16 (how they are stored) before use; zero
    points are integers in [0, 2^bits - 1]. Returns (rows,) float32 scales and zeros."""
    maxq = 2**bits - 1
    lo = w.float().amin(dim=1).clamp(max=0)
    hi = w.float().amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / maxq).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes clamp(round(w / s) + z, 0, 2^bits - 1) of ``w`` (rows, ...) with per-row
    ``scale`` and ``zero`` broadcast against it."""
    return (torch.round(w.float() / scale) + zero).clamp(0, 2**bits - 1)


def check_group_size(in_features: int, group_size: int, name: str = "layer") -> int:
    """The group size to use for a layer with ``in_features`` inputs: ``group_size``, or
    ``in_features`` for ``group_size=-1`` (one group per output row). Raises when it does not
    divide ``in_features``."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise ValueError(f"group_size must be a positive int or -1 (one group per row), got {group_size!r}")
    if group_size == -1:
        return in_features
    if in_features % group_size:
        divisors = [d for d in (256, 128, 64, 32, 16, 8) if in_features % d == 0]
        raise ValueError(
            f"group_size={group_size} does not divide {name}'s in_features={in_features}; use a group size "
            f"that divides the input size of every layer ({divisors or 'none of 256..8 does'} divide {in_features}) "
            "or group_size=-1 for one group per output row"
        )
    return group_size


def group_quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of (out, in) weights in groups of ``group_size`` consecutive input columns.

    Returns codes (out, in) uint8, scales (out, in // group_size) float16 and zero points
    (out, in // group_size) uint8.
    """
    out_f, in_f = w.shape
    g = check_group_size(in_f, group_size)
    groups = w.float().reshape(out_f * (in_f // g), g)  # one row per (output row, group)
    scale, zero = minmax_params(groups, bits)
    codes = round_to_grid(groups, scale[:, None], zero[:, None], bits)
    shape = (out_f, in_f // g)
    return codes.reshape(out_f, in_f).to(torch.uint8), scale.reshape(shape).half(), zero.reshape(shape).to(torch.uint8)


def group_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """codes (out, in), scales and zeros (out, groups) -> weights (out, in) float32: s * (q - z)."""
    out_f, in_f = codes.shape
    g = in_f // scales.shape[1]
    q = codes.float().reshape(out_f, -1, g)  # (out, groups, g)
    return ((q - zeros.float()[..., None]) * scales.float()[..., None]).reshape(out_f, in_f)


# ---------------------------------------------------------------------------------------------
# NF4 with double quantization (QLoRA)
# ---------------------------------------------------------------------------------------------
def blockwise_quantize(x: torch.Tensor, code: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization of a flat tensor in blocks onto a codebook (QLoRA eq. 1 with a
    non-uniform grid): each block is divided by its absmax and every value replaced by the index
    of the nearest code (ties go to the lower code, as in bitsandbytes). A last, shorter block
    is allowed. Returns (n,) uint8 indices and (n_blocks,) float32 absmax."""
    n = x.numel()
    n_blocks = -(-n // block_size)
    padded = F.pad(x.float().reshape(-1), (0, n_blocks * block_size - n)).reshape(n_blocks, block_size)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    midpoints = (code[:-1] + code[1:]) / 2  # the code is sorted: nearest code = bucket between midpoints
    idx = torch.bucketize(scaled.reshape(-1), midpoints.to(x.device))
    return idx[:n].to(torch.uint8), absmax


def blockwise_dequantize(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int) -> torch.Tensor:
    """(n,) uint8 indices and (n_blocks,) absmax -> (n,) float32 values code[idx] * absmax."""
    n = idx.numel()
    values = F.pad(code.to(absmax.device)[idx.long()], (0, absmax.numel() * block_size - n))
    return (values.reshape(-1, block_size) * absmax[:, None]).reshape(-1)[:n]


def nf4_quantize(w: torch.Tensor, block_size: int = 64, scale_block_size: int = 256) -> dict[str, torch.Tensor]:
    """QLoRA's NF4 storage of a weight tensor, flattened row-major.

    Returns ``weight_packed`` (numel / 2,) uint8 (two NF4 codes per byte, first in the high
    nibble), ``absmax_codes`` (n_blocks,) uint8 (the block scales c2 minus their mean, as
    8-bit dynamic floats), ``absmax_scales`` (ceil(n_blocks / 256),) float32 (c1) and
    ``absmax_offset`` () float32 (the mean of c2)."""
    if w.numel() % block_size:
        raise ValueError(f"a weight of {w.numel()} values does not split into NF4 blocks of {block_size}")
    codes, absmax = blockwise_quantize(w.reshape(-1), NF4_CODE, block_size)
    offset = absmax.mean()  # the scales are positive: centre them so the symmetric 8-bit grid fits
    absmax_codes, absmax_scales = blockwise_quantize(absmax - offset, DYNAMIC_CODE, scale_block_size)
    return {
        "weight_packed": pack_codes(codes, 4),
        "absmax_codes": absmax_codes,
        "absmax_scales": absmax_scales,
        "absmax_offset": offset,
    }


def nf4_dequantize(
    weight_packed: torch.Tensor, absmax_codes: torch.Tensor, absmax_scales: torch.Tensor, absmax_offset: torch.Tensor,
    shape: tuple[int, ...], block_size: int = 64, scale_block_size: int = 256,
) -> torch.Tensor:
    """Inverse of :func:`nf4_quantize`: the float32 weight of ``shape`` (QLoRA eq. 6)."""
    absmax = blockwise_dequantize(absmax_codes, absmax_scales, DYNAMIC_CODE, scale_block_size) + absmax_offset
    codes = unpack_codes(weight_packed, 4, weight_packed.numel() * 2)
    return blockwise_dequantize(codes, absmax, NF4_CODE, block_size).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Packed kernels: the fast path of Int8Linear and IntLinear (4 bits)
# ---------------------------------------------------------------------------------------------
#: Group sizes PyTorch's int4 kernels accept (CPU and CUDA).
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
#: CUDA's int4 layout tiles the input dimension in 16 * innerKTiles columns (gpt-fast's choice: 8).
INT4_CUDA_INNER_K_TILES = 8
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _has_kernel(op: str, device_type: str) -> bool:
    """Whether this PyTorch build registers aten::``op`` for the device ("CPU", "CUDA")."""
    return hasattr(torch.ops.aten, op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", device_type)


# Looked up once: a compiled decode step reads these constants instead of asking the dispatcher.
_CPU_INT8 = _has_kernel("_weight_int8pack_mm", "CPU")
_CPU_INT4 = _has_kernel("_weight_int4pack_mm_for_cpu", "CPU") and _has_kernel("_convert_weight_to_int4pack_for_cpu", "CPU")
_CUDA_INT4 = _has_kernel("_weight_int4pack_mm", "CUDA") and _has_kernel("_convert_weight_to_int4pack", "CUDA")
_SM80: dict[int, bool] = {}  # CUDA device index -> has bfloat16 tensor cores (sm80+)
# The CPU kernels are fast only in their AVX2 / AVX-512 versions; without them (ATEN_CPU_CAPABILITY=
# default, or another architecture) they run scalar loops, 10x slower than dequantize-then-multiply.
_CPU_SIMD = torch.backends.cpu.get_cpu_capability().startswith("AVX")


def _is_sm80(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM80:
        _SM80[index] = torch.cuda.get_device_capability(index) >= (8, 0)
    return _SM80[index]


def _kernel_dtype(x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype | None:
    """The activation dtype for a packed kernel on a CPU, or None for the reference path.

    PyTorch's CPU kernels are vectorized for bfloat16 activations only (in float32 they run a
    scalar loop, several times slower than dequantize-then-multiply). So by default (``compute_dtype=None``)
    only bfloat16 inputs take the kernel, and a float32 model stays exact to float32. An explicit
    ``compute_dtype`` runs the kernel in that dtype: bfloat16 for speed (float32 activations are
    rounded to bfloat16, as bitsandbytes' ``bnb_4bit_compute_dtype`` does), float32 to check the
    packing exactly. Without AVX2 / AVX-512 the kernels are scalar and slow, so bfloat16 takes
    the reference path there."""
    if torch.is_grad_enabled() and x.requires_grad:
        return None  # the kernels have no backward; training goes through the reference path
    dtype = compute_dtype or x.dtype
    if compute_dtype == torch.float32:
        return dtype  # asked for explicitly: the exact (slow) kernel, to check the packing
    if dtype != torch.bfloat16 or not _CPU_SIMD:
        return None
    return dtype


def int8_kernel_dtype(x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype :func:`int8_packed_mm` runs in for input ``x``, or None where it does not apply."""
    if x.device.type == "cuda":  # gpt-fast's form: any float dtype, fused by torch.compile
        dtype = compute_dtype or x.dtype
        return dtype if dtype in _KERNEL_DTYPES and not (torch.is_grad_enabled() and x.requires_grad) else None
    # The CPU kernel's AVX2/AVX-512 loops read the input dimension 16 values at a time and
    # crash (torch 2.13) when in_features is not a multiple of 16: those layers take the reference path.
    if x.device.type == "cpu" and _CPU_INT8 and x.shape[-1] % 16 == 0:
        return _kernel_dtype(x, compute_dtype)
    return None


def int8_packed_mm(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (weight_int8 * scale[:, None]).T`` without the float weight: x (rows, in) in the
    compute dtype, weight_int8 (out, in) int8 as stored, scale (out,) in x's dtype.

    The int8 layout is the stored one: the kernel wants the codes row-major (out, in), one byte
    each, and a scale per output row. It computes ``(x @ q.T) * s``, which equals the reference
    because the scale of row r only multiplies output r. On a CPU this is
    ``aten._weight_int8pack_mm``; on CUDA it is gpt-fast's ``F.linear(x, q.to(x.dtype)) * s``,
    which ``torch.compile`` fuses into one kernel that reads the int8 bytes (eager CUDA still
    materializes the float weight).
    """
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int8pack_mm(x, weight_int8, scale)
    return F.linear(x, weight_int8.to(x.dtype)) * scale


def int4_kernel_dtype(x: torch.Tensor, compute_dtype: torch.dtype | None, out_features: int, in_features: int,
                      group_size: int) -> torch.dtype | None:
    """The dtype :func:`int4_packed_mm` runs in for input ``x`` and this layer's shape, or None
    where PyTorch's int4 kernels do not apply (then the layer takes the reference path)."""
    if group_size not in INT4_KERNEL_GROUP_SIZES or in_features % group_size:
        return None
    if x.device.type == "cpu":
        if out_features % 16 or not _CPU_INT4:
            return None  # the CPU packing works on blocks of 16 output rows
        return _kernel_dtype(x, compute_dtype)
    if x.device.type == "cuda":
        # The CUDA kernel: tensor cores of sm80+, bfloat16 activations, tiles of 8 output rows
        # and 16 * innerKTiles input columns.
        dtype = compute_dtype or x.dtype
        if (dtype != torch.bfloat16 or out_features % 8 or in_features % (16 * INT4_CUDA_INNER_K_TILES)
                or not _CUDA_INT4 or not _is_sm80(x.device)
                or (torch.is_grad_enabled() and x.requires_grad)):
            return None
        return dtype
    return None


def int4_pack(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Our stored int4 format -> the layout of PyTorch's int4 kernels, on ``packed``'s device.

    In: packed (out, in / 2) uint8, two codes per byte, the first (even column) in the high
    nibble (:func:`pack_codes`); scales (out, groups) float16; zeros (out, groups) uint8.
    Out: the packed weight and ``scales_and_zeros`` (groups, out, 2) in ``dtype``.

    *Scales and zeros.* The kernels dequantize ``w = (q - 8) * scale + zero`` with a float zero,
    where we store ``w = s * (q - z)`` with an integer z. Both are affine in q, and they agree
    for ``scale = s`` and ``zero = s * (8 - z)`` (exact in float32: an 11-bit fp16 times a
    4-bit integer); in bfloat16 both round to 8 significant bits.

    *The CPU layout* (``_convert_weight_to_int4pack_for_cpu``, which takes the codes one per
    int32) depends on the vector width PyTorch picked at start-up: output rows are cut into
    blocks of BLOCK_N rows (64 with AVX-512, 32 with AVX2 or no SIMD); within a block, for every
    input column k, BLOCK_N / 2 bytes follow each other, and byte j holds row j in its low nibble
    and row j + BLOCK_N / 2 in its high nibble (AVX-512, AVX2; without SIMD: rows 2j and 2j + 1).
    So one vector load gets a column's codes for a whole block of outputs, and the kernel walks k
    broadcasting x[k]: a (out / BLOCK_N, in, BLOCK_N / 2) tensor, transposed and interleaved.

    *The CUDA layout* (``_convert_weight_to_int4pack``) tiles the codes for tensor-core mma
    instructions (tiles of 8 output rows by 16 * innerKTiles input columns); its input is our
    stored bytes exactly, (out, in / 2) uint8 with the first code in the high nibble, as gpt-fast
    packs them.

    Because the CPU layout depends on the machine, checkpoints keep the portable format above
    and layers pack at first use.
    """
    out_f = packed.shape[0]
    s = scales.float()
    scales_and_zeros = torch.stack([s, s * (8 - zeros.float())], dim=-1).transpose(0, 1).contiguous().to(dtype)
    if packed.device.type == "cpu":
        codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(out_f, -1).to(torch.int32)  # (out, in)
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # innerKTiles: unused on CPU
    else:
        weight = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), INT4_CUDA_INNER_K_TILES)
    return weight, scales_and_zeros


def int4_packed_mm(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` (rows, in) times the int4 weight packed by :func:`int4_pack` -> (rows, out), one pass
    over the 4-bit codes (4x fewer bytes than bfloat16, 8x fewer than float32)."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm(x, weight, group_size, scales_and_zeros)


def set_compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Run ``model``'s int8 and int4 layers' packed kernels with activations in ``dtype``
    (``torch.bfloat16``: the fast CPU kernels, for a float32 model too; ``torch.float32``: the
    kernels in float32, exact but slow on a CPU, to check them; None: the input's dtype, where
    float32 inputs take the exact reference path). Nothing stored changes; returns the model."""
    if dtype is not None and dtype not in _KERNEL_DTYPES:
        raise ValueError(f"compute_dtype must be None or one of {_KERNEL_DTYPES}, got {dtype!r}")
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.compute_dtype = dtype
    return model


# ---------------------------------------------------------------------------------------------
# Quantized linear layers
# ---------------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """What the three quantized linear layers share: ``forward(x) = x @ dequantize().T + bias``
    with the weight rebuilt in the input's dtype on every call, ``in_features``/``out_features``,
    and buffers that keep their storage dtype when the model is cast (``model.to(torch.bfloat16)``
    moves the scales but must not round them)."""

    in_features: int
    out_features: int
    #: The activations' dtype inside a packed kernel (see :func:`set_compute_dtype`); None: the input's.
    compute_dtype: torch.dtype | None = None
    _kernel: tuple | None = None  # (key, tensors): the weight in the kernel's layout, packed at first use

    def _init_bias(self, bias: bool, device: Any) -> None:
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device), requires_grad=False) if bias else None

    def dequantize(self) -> torch.Tensor:
        """The (out_features, in_features) float32 weight the stored codes stand for."""
        raise NotImplementedError

    # There is deliberately no ``weight`` attribute: code that reads ``layer.weight`` expects a
    # tensor it can update in place (merging a LoRA adapter, tying embeddings), and a freshly
    # dequantized copy would silently swallow such updates. It fails loudly instead.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        kernel_dtype = self._kernel_dtype(x)
        if kernel_dtype is not None:  # a fused kernel reads the packed codes directly (same result)
            out = self._packed_matmul(x.reshape(-1, self.in_features).to(kernel_dtype), self._kernel_tensors(x.device, kernel_dtype))
            out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias.to(x.dtype)
        # The reference path: rebuild the float weight, then an ordinary matrix product.
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # -- the packed-kernel path (overridden by Int8Linear and IntLinear) ------------------------
    def _kernel_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype to run a packed kernel in for input ``x``, or None for the reference path."""
        return None

    def _pack_for_kernel(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _packed_matmul(self, x: torch.Tensor, packed: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError

    def _kernel_tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The weight in the kernel's layout, packed once and kept (not saved: checkpoints keep the
        portable layout, which a kernel's layout is not). Repacked when a buffer changes."""
        if torch.compiler.is_compiling():  # the eager prefill packed it; a compiled step must not branch on it
            return self._kernel[1] if self._kernel is not None else self._pack_for_kernel(device, dtype)
        key = (device, dtype) + tuple(tensor_key(b) for b in self._buffers.values() if b is not None)
        if self._kernel is None or self._kernel[0] != key:
            with torch.inference_mode(False):  # usable outside inference mode too
                tensors = self._pack_for_kernel(device, dtype)
            if device.type == "cuda":  # a CUDA graph may keep their addresses instead of copying them in
                for t in tensors:
                    torch._dynamo.mark_static_address(t)
            self._kernel = (key, tensors)
        return self._kernel[1]

    def _apply(self, fn, recurse=True):
        saved = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)  # moved, not converted
        self._kernel = None  # another device may need another layout
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    """A linear layer stored as int8 codes with one float32 absmax scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device: Any = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self._init_bias(bias, device)

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        layer.weight_int8, layer.weight_scale = absmax_quantize(linear.weight.detach())
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer

    def dequantize(self) -> torch.Tensor:
        return absmax_dequantize(self.weight_int8, self.weight_scale)

    def _kernel_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        return int8_kernel_dtype(x, self.compute_dtype)

    def _pack_for_kernel(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        # The codes are used as they are stored, (out, in) int8; only the scales change dtype.
        return self.weight_int8, self.weight_scale.to(dtype)

    def _packed_matmul(self, x: torch.Tensor, packed: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return int8_packed_mm(x, *packed)


class IntLinear(QuantizedLinear):
    """A linear layer stored as ``bits``-bit codes (packed) with a float16 scale and a uint8
    zero point per group of ``group_size`` input columns: int4 round-to-nearest and GPTQ."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128, bias: bool = False, device: Any = None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = check_group_size(in_features, group_size)
        groups = in_features // self.group_size
        n_bytes = out_features * in_features * bits // 8
        self.register_buffer("weight_packed", torch.zeros(n_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self._init_bias(bias, device)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, bias: torch.Tensor | None = None) -> "IntLinear":
        """Wrap codes (out, in), scales and zeros (out, groups) made by :func:`group_quantize` or GPTQ."""
        out_f, in_f = codes.shape
        layer = cls(in_f, out_f, bits, in_f // scales.shape[1], bias is not None, codes.device)
        layer.weight_packed = pack_codes(codes, bits)
        layer.scales, layer.zeros = scales.half(), zeros.to(torch.uint8)
        if bias is not None:
            layer.bias.data = bias.detach().float().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int = 4, group_size: int = 128) -> "IntLinear":
        codes, scales, zeros = group_quantize(linear.weight.detach(), bits, group_size)
        return cls.from_codes(codes, scales, zeros, bits, linear.bias)

    def codes(self) -> torch.Tensor:
        """The unpacked codes, (out_features, in_features) uint8."""
        n = self.out_features * self.in_features
        return unpack_codes(self.weight_packed, self.bits, n).reshape(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return group_dequantize(self.codes(), self.scales, self.zeros)

    def _kernel_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        if self.bits != 4:
            return None
        return int4_kernel_dtype(x, self.compute_dtype, self.out_features, self.in_features, self.group_size)

    def _pack_for_kernel(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return int4_pack(self.weight_packed.reshape(self.out_features, -1), self.scales, self.zeros, dtype)

    def _packed_matmul(self, x: torch.Tensor, packed: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return int4_packed_mm(x, *packed, self.group_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, group_size={self.group_size}"


class NF4Linear(QuantizedLinear):
    """A linear layer stored in QLoRA's NF4 with double-quantized block scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block_size: int = 64,
                 scale_block_size: int = 256, device: Any = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.scale_block_size = block_size, scale_block_size
        n = in_features * out_features
        if n % block_size:
            raise ValueError(f"a {out_features}x{in_features} weight does not split into NF4 blocks of {block_size}")
        n_blocks = n // block_size
        self.register_buffer("weight_packed", torch.zeros(n // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_codes", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_scales", torch.ones(-(-n_blocks // scale_block_size), dtype=torch.float32, device=device))
        self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        self._init_bias(bias, device)

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int = 64, scale_block_size: int = 256) -> "NF4Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size, scale_block_size, linear.weight.device)
        for name, t in nf4_quantize(linear.weight.detach(), block_size, scale_block_size).items():
            setattr(layer, name, t)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer

    def dequantize(self) -> torch.Tensor:
        return nf4_dequantize(self.weight_packed, self.absmax_codes, self.absmax_scales, self.absmax_offset,
                              (self.out_features, self.in_features), self.block_size, self.scale_block_size)


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------
def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds quantized layers or says it does in its config."""
    config = getattr(model, "config", None)
    return getattr(config, "quantization_config", None) is not None or any(isinstance(m, QuantizedLinear) for m in model.modules())


def check_can_quantize(model: nn.Module) -> None:
    """Raise when ``model`` is already quantized (quantizing codes again would compound the
    rounding error and lose the original weights) or computes its projections in slices
    (``pretraining_tp > 1`` reads the weight matrices directly)."""
    if getattr(getattr(model, "config", None), "pretraining_tp", 1) != 1:
        raise ValueError("quantized layers need config.pretraining_tp == 1 (the slices read weights directly); "
                         "set model.config.pretraining_tp = 1 first: the slices only reproduce Meta's rounding")
    if is_quantized(model):
        qc = getattr(getattr(model, "config", None), "quantization_config", None) or {}
        raise ValueError(
            f"the model is already quantized (scheme {qc.get('scheme', '?')!r}); quantize the original "
            "full-precision model instead: load it again with from_pretrained and quantize that"
        )


def linear_layers_to_quantize(model: nn.Module, include_lm_head: bool = False) -> Iterator[tuple[str, nn.Linear]]:
    """``(name, module)`` for every ``nn.Linear`` to quantize: all of them except the task heads
    (``lm_head``, ``score``) unless ``include_lm_head``. Embeddings are not linear layers."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (include_lm_head or name.rsplit(".", 1)[-1] not in HEAD_NAMES):
            yield name, module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """``model.<name> = module`` for a dotted name such as ``model.layers.0.mlp.up_proj``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _check_scheme(scheme: str, bits: int | None) -> int:
    if scheme not in SCHEMES:
        hint = " (GPTQ is llama_edu.gptq.gptq(model, calibration_ids, ...))" if scheme == "gptq" else ""
        raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}{hint}")
    implemented = {"int8": (8,), "nf4": (4,), "int4": INT_BITS}[scheme]
    default = {"int8": 8, "nf4": 4, "int4": 4}[scheme]
    if bits is None:
        return default
    if bits not in implemented:
        raise ValueError(f"bits={bits!r} is not implemented for scheme {scheme!r}; use bits in {implemented}")
    return bits


def quantize(
    model: nn.Module,
    scheme: str,
    group_size: int = 128,
    *,
    bits: int | None = None,
    include_lm_head: bool = False,
    block_size: int = 64,
) -> nn.Module:
    """Replace ``model``'s linear layers in place by quantized ones and return the model.

    ``scheme``: ``"int8"`` (absmax per output row), ``"int4"`` (group-wise asymmetric RTN in
    groups of ``group_size`` input columns, -1 for one group per row; ``bits`` 2, 3, 4 or 8)
    or ``"nf4"`` (QLoRA's NormalFloat4, blocks of ``block_size``, double-quantized scales).
    The embeddings, norms and (unless ``include_lm_head``) the LM head stay in full precision.
    The scheme is recorded in ``model.config.quantization_config`` (a copy of the config, the
    model's own: see :func:`record_quantization`), which ``save_pretrained`` writes to
    config.json and ``from_pretrained`` reads back.
    """
    bits = _check_scheme(scheme, bits)
    check_can_quantize(model)
    config = getattr(model, "config", None)
    if include_lm_head and getattr(config, "tie_word_embeddings", False):
        raise ValueError(
            "the LM head is tied to the input embeddings (tie_word_embeddings=True): quantizing it would quantize "
            "the embeddings too. Keep include_lm_head=False, or untie first (model.lm_head.weight = "
            "nn.Parameter(model.lm_head.weight.detach().clone()); model.config.tie_word_embeddings = False)"
        )
    layers = list(linear_layers_to_quantize(model, include_lm_head))
    if scheme == "int4":
        for name, linear in layers:  # check every layer before changing any
            check_group_size(linear.in_features, group_size, name)
    for name, linear in layers:
        if scheme == "int8":
            new = Int8Linear.from_linear(linear)
        elif scheme == "int4":
            new = IntLinear.from_linear(linear, bits, group_size)
        else:
            new = NF4Linear.from_linear(linear, block_size)
        set_submodule(model, name, new)
    qconfig = {"quant_method": QUANT_METHOD, "scheme": scheme, "bits": bits, "modules": [n for n, _ in layers]}
    if scheme == "int4":
        qconfig["group_size"] = group_size
    if scheme == "nf4":
        qconfig.update(block_size=block_size, scale_block_size=256, double_quant=True)
    record_quantization(model, qconfig)
    return model


def record_quantization(model: nn.Module, qconfig: dict[str, Any]) -> None:
    """Set ``model.config.quantization_config = qconfig`` in a config of the model's own.
    ``LlamaForCausalLM(config)`` keeps the object it is given (as transformers does), so models
    built from one config share it; written there, a full-precision sibling would say it is
    quantized: ``quantize`` refused it and ``save_pretrained`` wrote a config.json that does not
    match its weights. The copy replaces the shared object in every module of this model that
    holds it, so this model's modules still read one config."""
    shared = getattr(model, "config", None)
    if shared is None:
        return
    own = copy.deepcopy(shared)
    own.quantization_config = qconfig
    for module in model.modules():
        if module.__dict__.get("config") is shared:
            module.config = own


def empty_quantized_layer(qconfig: dict[str, Any], in_features: int, out_features: int, bias: bool, device: Any = None) -> QuantizedLinear:
    """A quantized layer of the right shapes for ``qconfig``, to load a state dict into."""
    scheme = qconfig["scheme"]
    if scheme == "int8":
        return Int8Linear(in_features, out_features, bias, device)
    if scheme in ("int4", "gptq"):
        return IntLinear(in_features, out_features, qconfig["bits"], qconfig["group_size"], bias, device)
    return NF4Linear(in_features, out_features, bias, qconfig["block_size"], qconfig["scale_block_size"], device)


def prepare_quantized_model(model: nn.Module, qconfig: Any, source: Any = "the checkpoint") -> set[str]:
    """Swap the layers ``qconfig`` (a config.json ``quantization_config``) names for empty
    quantized ones, so that a quantized checkpoint's state dict loads into ``model``.

    Returns the state-dict keys of their buffers, which loading must keep in their stored
    dtypes. Raises for a ``quantization_config`` this package did not write."""
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        method = qconfig.get("quant_method") if isinstance(qconfig, dict) else qconfig
        raise ValueError(
            f"{source} was quantized with {method!r}, a format llama_edu cannot read (it reads quant_method "
            f"{QUANT_METHOD!r}, written by llama_edu.quantize); load the original full-precision checkpoint instead"
        )
    if qconfig.get("scheme") not in SCHEMES + ("gptq",):
        raise ValueError(f"{source} has an unknown quantization scheme {qconfig.get('scheme')!r} in config.json's quantization_config")
    keys: set[str] = set()
    prefix = getattr(model, "base_model_prefix", "model") + "."
    has_prefix = hasattr(model, prefix[:-1])
    for name in qconfig["modules"]:
        if not has_prefix and name.startswith(prefix):  # a LlamaForCausalLM checkpoint loaded as LlamaModel
            name = name[len(prefix):]
        elif has_prefix and not name.startswith(prefix) and not name.startswith(HEAD_NAMES):  # and the other way round
            name = prefix + name
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"config.json's quantization_config names a layer {name!r} that the model does not have") from None
        new = empty_quantized_layer(qconfig, linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        set_submodule(model, name, new)
        keys.update(f"{name}.{b}" for b in new._buffers)
    return keys


QUANTIZED_KEY_SUFFIXES = (".weight_int8", ".weight_packed", ".absmax_codes", ".scales")


def quantized_checkpoint_hint(keys: list[str]) -> str | None:
    """A sentence for a loader that met quantized weights it did not expect, else ``None``."""
    if any(k.endswith(QUANTIZED_KEY_SUFFIXES) for k in keys):
        return (
            "these are quantized weights (llama_edu.quantize): load them with the config.json saved beside them, "
            "whose quantization_config tells from_pretrained how to rebuild the quantized layers "
            "(do not pass another config or quantization_config=None)"
        )
    return None


def weight_bytes(model: nn.Module) -> int:
    """Bytes of everything a checkpoint stores: parameters and persistent buffers, a tied
    tensor once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.state_dict(keep_vars=True).values()):
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
