"""Shared test helpers: twin models (ours and transformers') with identical weights."""

from __future__ import annotations

import pytest
import torch

import llama_edu

# The models under test are tiny: one thread avoids oversubscribing a 2-core machine, where
# PyTorch's thread pool competing with other processes made tests many times slower.
torch.set_num_threads(1)

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


def twins(cls_name: str = "LlamaForCausalLM", seed: int = 0, **overrides):
    """A freshly built transformers model and ours, same config and same random weights, in eval mode."""
    transformers = pytest.importorskip("transformers")
    kw = {**SMALL, **overrides}
    torch.manual_seed(seed)
    theirs = getattr(transformers, cls_name)(transformers.LlamaConfig(**kw)).eval()
    ours = getattr(llama_edu, cls_name)(llama_edu.LlamaConfig(**kw)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
