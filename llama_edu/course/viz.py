"""Plotting helpers the notebooks share: heatmaps, attention maps, RoPE rotations, bars.

Every function draws one titled, labelled picture and returns the matplotlib ``Figure`` (so a
notebook can ``plt.show()`` it and a test can inspect it). Functions that draw a single panel
take an optional ``ax`` to draw into an existing grid of subplots. Inputs may be torch tensors
or numpy arrays; tensors are detached and moved to the CPU first.

This is a flat module of independent functions: add a new picture as a new function.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def to_numpy(x) -> np.ndarray:
    """A torch tensor (any device/dtype) or array-like -> float numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def _new_ax(ax, figsize: tuple[float, float]):
    """Return (figure, ax): the given ax and its figure, or a new single-panel figure."""
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def plot_heatmap(
    matrix,
    title: str,
    xlabel: str,
    ylabel: str,
    ax=None,
    cmap: str = "viridis",
    colorbar: bool = True,
    xticklabels: Sequence[str] | None = None,
    yticklabels: Sequence[str] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    figsize: tuple[float, float] = (6, 5),
    colorbar_label: str = "",
) -> Figure:
    """Draw a 2-D ``matrix`` (rows, cols) as an image: rows go down the y axis, columns along x;
    rows and columns without labels get integer ticks (layer 0, 1, ..., never 0.5); the colour bar
    says what a colour means (``colorbar_label``)."""
    m = to_numpy(matrix)
    if m.ndim != 2:
        raise ValueError(f"plot_heatmap needs a 2-D matrix, got shape {m.shape}; index or reshape it first")
    fig, ax = _new_ax(ax, figsize)
    im = ax.imshow(m, cmap=cmap, aspect="auto", interpolation="nearest", vmin=vmin, vmax=vmax)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)))
        ax.set_xticklabels(xticklabels, rotation=90, fontsize=9)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if yticklabels is not None:
        ax.set_yticks(range(len(yticklabels)))
        ax.set_yticklabels(yticklabels, fontsize=9)
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=colorbar_label)
    return fig


def plot_attention_maps(
    weights,
    tokens: Sequence[str] | None = None,
    title: str = "Attention weights",
    head_names: Sequence[str] | None = None,
    ncols: int = 4,
    cmap: str = "magma",
    panel_size: float = 3.0,
) -> Figure:
    """One heatmap per head from attention weights (heads, query, key) or (query, key).

    Row i shows how query position i distributes its attention over key positions. ``tokens``
    labels both axes when given (the tokens' text, e.g. from ``tokenizer.convert_ids_to_tokens``). ``panel_size`` is the
    height of one panel in inches.
    """
    w = to_numpy(weights)
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3:
        raise ValueError(f"weights must be (heads, query, key) or (query, key), got shape {w.shape}")
    heads = w.shape[0]
    ncols = max(1, min(ncols, heads))
    nrows = math.ceil(heads / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.07 * panel_size * ncols, panel_size * nrows + 0.4),
                             squeeze=False)
    for h in range(nrows * ncols):
        ax = axes[h // ncols][h % ncols]
        if h >= heads:
            ax.axis("off")
            continue
        name = head_names[h] if head_names is not None else f"head {h}"
        plot_heatmap(w[h], name, "key position", "query position", ax=ax, cmap=cmap, colorbar=False,
                     vmin=0.0, vmax=1.0, xticklabels=tokens, yticklabels=tokens)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_rope_rotation(
    thetas: Sequence[float],
    positions: Sequence[int] | int = 8,
    vector: Sequence[float] = (1.0, 0.0),
    title: str = "RoPE: one 2-D pair rotated by m·θ_i",
) -> Figure:
    """One panel per frequency theta_i: the 2-D pair ``vector`` rotated by m * theta_i for each
    position m, drawn as arrows (darker = later position) on the unit circle."""
    if isinstance(positions, int):
        positions = list(range(positions))
    v = np.asarray(vector, dtype=float)
    n = len(thetas)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 1, len(positions)))
    circle = np.linspace(0, 2 * np.pi, 200)
    for ax, theta in zip(axes[0], thetas):
        ax.plot(np.cos(circle) * np.linalg.norm(v), np.sin(circle) * np.linalg.norm(v), color="0.85", lw=1)
        for c, m in zip(colors, positions):
            a = m * theta
            x = v[0] * math.cos(a) - v[1] * math.sin(a)  # eq. 13 of RoFormer: R(m θ) v
            y = v[0] * math.sin(a) + v[1] * math.cos(a)
            ax.annotate("", xy=(x, y), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color=c, lw=1.5))
            ax.text(1.12 * x, 1.12 * y, str(m), fontsize=9, ha="center", va="center", color=c)
        lim = 1.3 * max(np.linalg.norm(v), 1e-6)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(f"θ = {theta:.3g} rad/position")
        ax.set_xlabel("dimension i")
        ax.set_ylabel("dimension i + d/2")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_bars(
    values: Mapping[str, float] | Mapping[str, Sequence[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    groups: Sequence[str] | None = None,
    ax=None,
    logy: bool = False,
    figsize: tuple[float, float] = (7, 4),
) -> Figure:
    """Bar chart. ``values`` maps a series name to one number (simple bars) or to one number per
    entry of ``groups`` (grouped bars: one cluster per group, one colour per series)."""
    fig, ax = _new_ax(ax, figsize)
    names = list(values)
    if groups is None:
        heights = [float(values[n]) for n in names]
        bars = ax.bar(names, heights, color=plt.cm.tab10(np.arange(len(names)) % 10))
        ax.bar_label(bars, fmt="%.3g", fontsize=9)
    else:
        x = np.arange(len(groups))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            series = [float(v) for v in values[n]]
            if len(series) != len(groups):
                raise ValueError(f"series {n!r} has {len(series)} values but there are {len(groups)} groups")
            bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, series, width, label=n)
            ax.bar_label(bars, fmt="%.3g", fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels(groups)
        ax.legend()
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig


def plot_lines(
    x,
    ys: Mapping[str, Sequence[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    ax=None,
    logy: bool = False,
    figsize: tuple[float, float] = (7, 4),
) -> Figure:
    """Several curves over the same ``x``, one per entry of ``ys`` (name -> values), with a legend."""
    fig, ax = _new_ax(ax, figsize)
    xs = to_numpy(x)
    for name, y in ys.items():
        ax.plot(xs, to_numpy(y), label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    return fig


def plot_llama_block(ax=None, figsize: tuple[float, float] = (5.5, 7)) -> Figure:
    """A box diagram of one Llama decoder layer (pre-norm, RoPE attention, SwiGLU, residuals)
    between the token embedding and the output head, labelled with the notebooks that build it."""
    fig, ax = _new_ax(ax, figsize)
    boxes = [  # (label, y, colour) from bottom to top
        ("token ids → embed_tokens  [02]", 0.5, "#cfe2f3"),
        ("input_layernorm: RMSNorm  [02]", 1.5, "#d9ead3"),
        ("self_attn: GQA + RoPE  [03, 04]", 2.5, "#fce5cd"),
        ("post_attention_layernorm: RMSNorm", 3.7, "#d9ead3"),
        ("mlp: SwiGLU  [05]", 4.7, "#ead1dc"),
        ("norm: RMSNorm → lm_head  [06]", 6.1, "#cfe2f3"),
    ]
    for label, y, colour in boxes:
        ax.add_patch(plt.Rectangle((0.1, y - 0.3), 0.8, 0.6, facecolor=colour, edgecolor="black"))
        ax.text(0.5, y, label, ha="center", va="center", fontsize=9)
    for (_, y0, _), (_, y1, _) in zip(boxes, boxes[1:]):
        ax.annotate("", xy=(0.5, y1 - 0.3), xytext=(0.5, y0 + 0.3), arrowprops=dict(arrowstyle="->"))
    for start, end in ((1.0, 3.1), (3.2, 5.3)):  # the two residual connections: x + f(norm(x))
        ax.plot([0.5, 1.0, 1.0], [start, start, end], color="tab:red", lw=1.2)
        ax.annotate("", xy=(0.5, end), xytext=(1.0, end), arrowprops=dict(arrowstyle="->", color="tab:red"))
        ax.text(1.03, (start + end) / 2, "+ residual", color="tab:red", fontsize=9, va="center", rotation=90)
    ax.add_patch(plt.Rectangle((0.03, 1.0), 0.94, 4.35, fill=False, linestyle="--", edgecolor="0.4"))
    ax.text(0.05, 5.45, "decoder layer × num_hidden_layers", fontsize=9, color="0.3")
    ax.set_xlim(0, 1.12)
    ax.set_ylim(0, 6.6)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("Llama 2, bottom to top [notebook]")
    ax.set_xlabel("data flows bottom → top")
    ax.set_ylabel("depth")
    return fig
