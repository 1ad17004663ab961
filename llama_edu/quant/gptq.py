"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), written out, and the ``quantize`` command.

Round-to-nearest (RTN) rounds every weight on its own. GPTQ rounds the columns of a weight
matrix one at a time and, after each, nudges the columns not yet rounded so that the layer's
*output* on real inputs X changes as little as possible: it minimises ||W X - W_hat X||^2, whose
Hessian with respect to a row of W is H = 2 X X^T (eq. 1-2, from Optimal Brain Quantization).
Rounding column j with error e_j = (w_j - q_j) / [H^-1]_jj is compensated by

    W[:, j:] -= e_j [H^-1]_{j, j:}                                               (eq. 3, Algorithm 1)

with H^-1 taken in its upper Cholesky form, so the rows of that factor are exactly the
updates each step needs ("Step 3: Cholesky Reformulation"). The updates are applied inside
blocks of ``block_size`` columns and to the rest of the matrix once per block ("lazy batch
updates"), ``percdamp`` x mean(diag H) is added to the diagonal for numerical stability, and
with ``act_order`` columns with the largest diag(H) go first.

Layers are quantized one decoder layer at a time, in one pass over the depth (the paper's
sequential procedure): the calibration text goes through the model's own forward only up to the
first decoder layer, whose inputs (hidden states, RoPE angles, mask) are kept. Then, for each
layer: run it on those inputs with forward hooks on its linear layers, which record the inputs X
of every projection (all from the layer with its float weights, as the reference code does);
quantize its projections; run the *quantized* layer on the same inputs, whose outputs are the
next layer's inputs. Each layer runs twice per calibration batch (the last once), so the cost
grows linearly with depth. Each layer is stored as :class:`llama_edu.quantize.IntLinear` (the
same format as int4 RTN), so the two compare at equal size.

This module also holds the ``python -m llama_edu quantize`` command, since it is the one that
sees every scheme.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .quantize import (
    INT_BITS,
    QUANT_METHOD,
    IntLinear,
    check_group_size,
    check_can_quantize,
    minmax_params,
    record_quantization,
    round_to_grid,
    set_submodule,
)
from ..text.tokenizer import LlamaTokenizer


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's Algorithm 1 on one weight matrix.

    ``weight`` (out, in); ``hessian`` (in, in) = 2 X X^T / n from the layer's inputs X (in, n).
    Returns codes (out, in) uint8, scales and zero points (out, in // group_size) in the layout
    of :func:`llama_edu.quantize.group_quantize`, and the per-column loss sum_rows e^2 / 2 the
    algorithm minimised (in,), in the original column order.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    g = check_group_size(cols, group_size)
    dead = H.diagonal() == 0  # inputs that were always 0: nothing to compensate with
    H[dead, dead] = 1
    W[:, dead] = 0

    dev = W.device
    scales = torch.zeros(rows, cols // g, device=dev)
    zeros = torch.zeros(rows, cols // g, device=dev)
    if act_order:
        # Columns in order of decreasing diag(H); groups stay the original consecutive columns,
        # so their scales are fixed up front (the "static groups" of the reference code).
        perm = torch.argsort(H.diagonal(), descending=True)
        for k in range(cols // g):
            scales[:, k], zeros[:, k] = minmax_params(W[:, k * g : (k + 1) * g], bits)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(cols, device=dev)

    H.diagonal().add_(percdamp * H.diagonal().mean())
    # H^-1 = U^T U with U upper triangular: row j of U, divided by U_jj, is [H^-1]_{j,j:} of the
    # columns still to quantize after j (the Cholesky form of Algorithm 1).
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=dev)
    losses = torch.zeros(cols, device=dev)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        errors = torch.zeros(rows, i2 - i1, device=dev)  # (out, block)
        for i in range(i1, i2):
            col = int(perm[i])  # the column's place in the original weight
            if not act_order and i % g == 0:
                scales[:, i // g], zeros[:, i // g] = minmax_params(W[:, i : i + g], bits)
            s, z = scales[:, col // g], zeros[:, col // g]
            w = W[:, i]
            q = round_to_grid(w, s, z, bits)
            codes[:, col] = q.to(torch.uint8)
            err = (w - s * (q - z)) / U[i, i]
            losses[col] = (err**2).sum() / 2
            W[:, i:i2] -= err[:, None] * U[i, i:i2][None, :]  # compensate inside the block now
            errors[:, i - i1] = err
        W[:, i2:] -= errors @ U[i1:i2, i2:]  # and the rest of the matrix once per block (lazy)
    return codes, scales.half(), zeros.to(torch.uint8), losses


class _LayerInputsCaught(Exception):
    """Raised by a pre-hook on the first decoder layer once it has its inputs: the rest of the
    model's forward is not needed."""


def _first_layer_inputs(model: nn.Module, first_layer: nn.Module, batches: list[torch.Tensor], device) -> list[tuple]:
    """The arguments the first decoder layer is called with, as (args, kwargs), one per batch:
    hidden states (batch, seq, hidden), RoPE's cos and sin, the mask, ... made by the model's own
    forward (embeddings, rotary table, mask), which is stopped before the layer runs."""
    caught: list[tuple] = []

    def catch(module, args, kwargs):
        caught.append((args, kwargs))
        raise _LayerInputsCaught

    handle = first_layer.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _LayerInputsCaught:
                pass
    finally:
        handle.remove()
    if len(caught) != len(batches):
        raise RuntimeError(f"the model's forward ran its first decoder layer {len(caught)} times for {len(batches)} batches")
    return caught


def _batches(calibration_ids: Any, batch_size: int) -> list[torch.Tensor]:
    if calibration_ids is None:
        raise ValueError("GPTQ needs calibration data: pass calibration_ids, token ids of real text (batch, seq), "
                         "e.g. 32 windows of 256 tokens of the training text (CLI: --calibration-text FILE)")
    if isinstance(calibration_ids, torch.Tensor):
        ids = calibration_ids if calibration_ids.dim() == 2 else calibration_ids.reshape(1, -1)
        rows: list[torch.Tensor] = list(ids)
    else:
        rows = [torch.as_tensor(r).reshape(-1) for r in calibration_ids]
    rows = [r for r in rows if r.numel() > 0]
    if not rows:
        raise ValueError("GPTQ needs calibration data, and calibration_ids holds no tokens; pass token ids of real "
                         "text (batch, seq), e.g. 32 windows of 256 tokens of the training text")
    if any(r.dtype.is_floating_point for r in rows):
        raise TypeError("calibration_ids must be integer token ids, not floats")
    if len({r.numel() for r in rows}) == 1:
        stacked = torch.stack(rows).long()
        return list(stacked.split(batch_size))
    return [r.long()[None] for r in rows]  # ragged: one sequence at a time


@torch.no_grad()
def gptq(
    model: nn.Module,
    calibration_ids: torch.Tensor | Iterable[torch.Tensor],
    bits: int = 4,
    group_size: int = 128,
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    batch_size: int = 8,
) -> nn.Module:
    """Quantize every linear layer of ``model``'s decoder layers with GPTQ, in place, and return
    the model. ``calibration_ids``: (n, seq) token ids (or a list of 1-D tensors) of text like
    the text the model will see. ``bits`` 2, 3, 4 or 8; ``group_size`` input columns share a
    scale (-1: one per row). The embeddings and the LM head stay in full precision.
    """
    if bits not in INT_BITS:
        raise ValueError(f"bits={bits!r} is not implemented for GPTQ; use bits in {INT_BITS}")
    check_can_quantize(model)
    batches = _batches(calibration_ids, batch_size)
    layers = model.get_base_model().layers
    names: list[str] = []
    for li, layer in enumerate(layers):  # check every layer before changing any
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear):
                check_group_size(m.in_features, group_size, f"layers.{li}.{name}")
    full_name = {id(m): n for n, m in model.named_modules()}  # for quantization_config["modules"]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    inputs = _first_layer_inputs(model, layers[0], batches, device)  # per batch: the layer's arguments
    for li, layer in enumerate(layers):
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        hessians = {name: torch.zeros(m.in_features, m.in_features, device=device) for name, m in linears.items()}
        counts = dict.fromkeys(linears, 0)

        def record(name):
            def hook(module, module_inputs, output):
                x = module_inputs[0].detach().reshape(-1, module.in_features).float()  # (tokens, in)
                hessians[name] += 2 * x.T @ x
                counts[name] += x.shape[0]
            return hook

        handles = [m.register_forward_hook(record(name)) for name, m in linears.items()]
        try:
            for args, kwargs in inputs:  # the float layer: its projections' inputs X
                layer(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for name, m in linears.items():
            H = hessians[name] / counts[name]  # 2 X X^T / n
            codes, scales, zeros, _ = gptq_quantize_weight(m.weight.to(device), H, bits, group_size, block_size, percdamp, act_order)
            set_submodule(layer, name, IntLinear.from_codes(codes, scales, zeros, bits, m.bias).to(device))
            names.append(full_name[id(m)])
        if li + 1 < len(layers):  # the quantized layer's outputs are the next layer's inputs
            inputs = [((layer(*args, **kwargs)[0], *args[1:]), kwargs) for args, kwargs in inputs]
    if was_training:
        model.train()
    n_tokens = sum(b.numel() for b in batches)
    record_quantization(model, {
        "quant_method": QUANT_METHOD, "scheme": "gptq", "bits": bits, "group_size": group_size,
        "act_order": act_order, "percdamp": percdamp, "block_size": block_size,
        "calibration_tokens": n_tokens, "modules": names,
    })
    return model


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
def calibration_from_text(model_dir: Path, text_file: Path, n: int, seq_len: int) -> torch.Tensor:
    """``n`` evenly spaced windows of ``seq_len`` tokens of ``text_file``, tokenized with the
    tokenizer saved in ``model_dir``."""
    if not text_file.is_file():
        raise FileNotFoundError(f"calibration text {text_file} not found; pass --calibration-text with a UTF-8 text file")
    if not (model_dir / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.model to tokenize the calibration text with; "
                                "GPTQ needs a model folder that includes its tokenizer")
    tok = LlamaTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tok(text_file.read_text(encoding="utf-8")).input_ids, dtype=torch.long)
    if len(ids) < seq_len:
        raise ValueError(f"{text_file} has {len(ids)} tokens, fewer than one calibration window of {seq_len}; pass more text")
    starts = torch.linspace(0, len(ids) - seq_len, min(n, len(ids) // seq_len)).long()
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
