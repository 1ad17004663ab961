"""The notebooks' plotting helpers return titled, labelled figures (drawn off-screen)."""

import matplotlib

matplotlib.use("Agg")  # no display needed

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from llama_edu import viz


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_heatmap_takes_tensors_and_labels_axes():
    fig = viz.plot_heatmap(torch.arange(12.0).reshape(3, 4), "my title", "cols", "rows")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("my title", "cols", "rows")
    np.testing.assert_array_equal(ax.images[0].get_array(), np.arange(12.0).reshape(3, 4))


def test_heatmap_draws_into_given_ax_and_rejects_3d():
    fig, axes = plt.subplots(1, 2)
    assert viz.plot_heatmap(np.eye(3), "t", "x", "y", ax=axes[1], colorbar=False) is fig
    assert axes[1].get_title() == "t" and axes[0].get_title() == ""
    with pytest.raises(ValueError, match="2-D"):
        viz.plot_heatmap(np.zeros((2, 2, 2)), "t", "x", "y")


def test_attention_maps_one_panel_per_head_with_token_labels():
    w = torch.softmax(torch.randn(1, 6, 5, 5), dim=-1)[0]  # (heads, q, k)
    fig = viz.plot_attention_maps(w, tokens=list("abcde"), title="layer 0", ncols=4)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == [f"head {h}" for h in range(6)]
    assert fig._suptitle.get_text() == "layer 0"
    assert [t.get_text() for t in panels[0].get_xticklabels()] == list("abcde")
    assert panels[0].get_xlabel() == "key position" and panels[0].get_ylabel() == "query position"


def test_rope_rotation_one_panel_per_frequency():
    fig = viz.plot_rope_rotation([1.0, 0.1], positions=4)
    assert len(fig.axes) == 2
    assert fig.axes[0].get_title().startswith("θ = 1")
    labels = [t for t in fig.axes[0].texts if t.get_text()]  # arrows are empty-text annotations
    assert [t.get_text() for t in labels] == ["0", "1", "2", "3"]
    # position 1 at theta = 1 lands at (cos 1, sin 1) times the label offset
    x, y = labels[1].get_position()
    assert np.allclose((x, y), (1.12 * np.cos(1.0), 1.12 * np.sin(1.0)))


def test_bars_simple_and_grouped():
    fig = viz.plot_bars({"a": 1.0, "b": 3.0}, "simple", "kind", "value")
    ax = fig.axes[0]
    assert ax.get_title() == "simple" and [p.get_height() for p in ax.patches] == [1.0, 3.0]
    fig = viz.plot_bars({"MHA": [1, 2], "GQA": [0.5, 1]}, "grouped", "model", "MB", groups=["7B", "70B"], logy=True)
    ax = fig.axes[0]
    assert len(ax.patches) == 4 and ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["MHA", "GQA"]
    with pytest.raises(ValueError, match="groups"):
        viz.plot_bars({"MHA": [1]}, "t", "x", "y", groups=["7B", "70B"])


def test_lines_and_block_diagram():
    fig = viz.plot_lines(range(3), {"one": [1, 2, 3], "two": [3, 2, 1]}, "lines", "x", "y")
    assert [line.get_label() for line in fig.axes[0].lines] == ["one", "two"]
    fig = viz.plot_llama_block()
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel()
    assert any("RMSNorm" in t.get_text() for t in ax.texts)
