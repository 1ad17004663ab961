"""Exercises of notebook 05_feedforward_and_block."""

from __future__ import annotations

import functools
import torch
import torch.nn.functional as F
from ...attention import causal_mask as _package_causal_mask
from ...config import LlamaConfig
from ...mlp import LlamaMLP, swiglu_hidden_size
from ...model import LlamaDecoderLayer
from ...rope import LlamaRotaryEmbedding

from .checking import Cases, register, _gen


def _swiglu_reference(x, w_gate, w_up, w_down):
    config = LlamaConfig(hidden_size=w_gate.shape[1], intermediate_size=w_gate.shape[0], num_attention_heads=1,
                         num_key_value_heads=1, vocab_size=1)
    mlp = LlamaMLP(config).to(x.dtype)
    mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data = w_gate, w_up, w_down
    return mlp(x)


def _swiglu_cases() -> Cases:
    g = _gen(6)

    def weights(d, i):
        return torch.randn(i, d, generator=g) / d**0.5, torch.randn(i, d, generator=g) / d**0.5, torch.randn(d, i, generator=g) / i**0.5

    return [
        ("hidden 8, intermediate 24", (torch.randn(3, 8, generator=g), *weights(8, 24))),
        ("batch (2, 5, 16), intermediate 48", (torch.randn(2, 5, 16, generator=g), *weights(16, 48))),
        ("square weights (hidden = intermediate = 12)", (torch.randn(4, 12, generator=g), *weights(12, 12))),
    ]


register(
    "swiglu", "05_feedforward_and_block", "(x, w_gate, w_up, w_down)",
    "(silu(x w_gate^T) * (x w_up^T)) w_down^T",
    reference=_swiglu_reference,
    cases=_swiglu_cases,
    mistakes=[
        (lambda x, g, u, d: (x @ g.T * F.silu(x @ u.T)) @ d.T,
         "SiLU is on the up branch; it belongs on the gate branch", "silu(x @ w_gate.T) * (x @ w_up.T)"),
        (lambda x, g, u, d: F.silu(x @ g.T * (x @ u.T)) @ d.T,
         "SiLU is applied after the product, to both branches", "only the gate goes through SiLU"),
        (lambda x, g, u, d: (x @ g.T * (x @ u.T)) @ d.T, "SiLU is missing (that is a bilinear GLU)", "apply F.silu to the gate"),
        (lambda x, g, u, d: (F.gelu(x @ g.T) * (x @ u.T)) @ d.T, "GELU instead of SiLU (that is GeGLU)", "Llama uses F.silu"),
        (lambda x, g, u, d: (F.silu(x @ g) * (x @ u)) @ d,
         "the weights are not transposed: nn.Linear stores (out_features, in_features)", "use x @ w.T (or F.linear(x, w))"),
        (lambda x, g, u, d: (F.relu(x @ g.T) * (x @ u.T)) @ d.T, "ReLU instead of SiLU (that is ReGLU)", "F.silu(x @ w_gate.T): x * sigmoid(x)"),
        (lambda x, g, u, d: (torch.sigmoid(x @ g.T) * (x @ u.T)) @ d.T,
         "sigmoid instead of SiLU: that is the original GLU gate; SiLU is x * sigmoid(x)", "F.silu(x @ w_gate.T)"),
        (lambda x, g, u, d: (F.silu(x @ g.T) + (x @ u.T)) @ d.T,
         "the two branches are added; the gate multiplies the up branch element by element", "silu(x @ w_gate.T) * (x @ w_up.T)"),
        (lambda x, g, u, d: (F.silu(x @ g.T) * x @ u.T) @ d.T,
         "operator precedence: * and @ bind left to right, so silu(...) * x @ w_up.T multiplies by x first", "add parentheses: silu(x @ w_gate.T) * (x @ w_up.T)"),
        (lambda x, g, u, d: F.silu(x @ g.T) * (x @ u.T),
         "the down projection is missing: the result stays in the intermediate size", "end with @ w_down.T"),
        (lambda x, g, u, d: F.silu((F.silu(x @ g.T) * (x @ u.T)) @ d.T),
         "SiLU is applied again after the down projection", "only the gate goes through SiLU: (silu(x w_gate^T) * x w_up^T) w_down^T"),
        (lambda x, g, u, d: (F.silu(x @ g.T) * (x @ u.T)) @ d,
         "w_down is not transposed: nn.Linear stores (out_features, in_features)", "... @ w_down.T"),
        (lambda x, g, u, d: (F.silu(x @ g.T) * (x @ g.T)) @ d.T,
         "the gate weight is used for both branches; the up branch has its own weight, w_up", "silu(x @ w_gate.T) * (x @ w_up.T)"),
        (lambda x, g, u, d: (F.silu(x @ g.T) @ d.T) * ((x @ u.T) @ d.T),
         "each branch is projected down before the product; the product comes first, in the intermediate size",
         "(silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T"),
    ],
)


@functools.lru_cache(maxsize=1)
def _small_layer() -> LlamaDecoderLayer:
    """A decoder layer with random weights whose two norms differ (so swapping them shows)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=16, rms_norm_eps=1e-5)
    layer = LlamaDecoderLayer(config, 0).eval()
    g = _gen(7)
    layer.input_layernorm.weight.data = torch.rand(32, generator=g) + 0.5
    layer.post_attention_layernorm.weight.data = torch.rand(32, generator=g) * 2
    return layer


def _decoder_layer_cases() -> Cases:
    g = _gen(8)
    layer = _small_layer()

    def inputs(b, s, masked=True, hide_first=False):
        cos, sin = LlamaRotaryEmbedding(8)(torch.arange(s)[None].expand(b, s), s, torch.float32)
        mask = _package_causal_mask(torch.arange(s), s) if masked else None  # (1, 1, s, s), True = attend
        if hide_first:  # key 0 hidden from the later queries: a mask that is not the causal flag
            mask = mask.clone()
            mask[..., 2:, 0] = False
        return layer, torch.randn(b, s, 32, generator=g) * 3, cos, sin, mask

    return [("1 sequence of 5 tokens", inputs(1, 5)), ("batch 2 of 7 tokens", inputs(2, 7)),
            ("mask None (the kernel's causal flag)", inputs(1, 4, masked=False)),
            ("a mask that also hides key 0 from queries 2..5", inputs(1, 6, hide_first=True))]


def _attn(layer, x, cos, sin, mask):
    return layer.self_attn(x, cos, sin, mask)[0]


register(
    "decoder_layer", "05_feedforward_and_block", "(layer, hidden_states, cos, sin, mask)",
    "the pre-norm residual block with the layer's modules: h = x + attn(norm1(x)); return h + mlp(norm2(h))",
    reference=lambda layer, x, cos, sin, mask: layer(x, cos, sin, mask)[0],
    cases=_decoder_layer_cases,
    mistakes=[
        (lambda L, x, c, s, m: L.post_attention_layernorm((h := L.input_layernorm(x + _attn(L, x, c, s, m))) + L.mlp(h)),
         "post-norm (normalising after the residual sum, as the 2017 Transformer): Llama normalises the input of each sub-block",
         "h = x + self_attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))"),
        (lambda L, x, c, s, m: L.mlp(L.post_attention_layernorm(_attn(L, L.input_layernorm(x), c, s, m))),
         "no residual connections: the block's input is not added back", "add x to the attention output, and h to the MLP output"),
        (lambda L, x, c, s, m: (h := x + _attn(L, L.input_layernorm(x), c, s, m)) + L.mlp(L.input_layernorm(h)),
         "the same norm is used twice; the MLP has its own, post_attention_layernorm", "use layer.post_attention_layernorm before the MLP"),
        (lambda L, x, c, s, m: (h := (n := L.input_layernorm(x)) + _attn(L, n, c, s, m)) + L.mlp(L.post_attention_layernorm(h)),
         "the residual adds the normalised x instead of x itself", "the residual stream carries the un-normalised x: h = x + attn(norm(x))"),
        (lambda L, x, c, s, m: x + L.self_attn(L.input_layernorm(x), c, s, m),
         "layer.self_attn returns a pair (output, attention weights)", "take the first element: layer.self_attn(...)[0]"),
        (lambda L, x, c, s, m: (h := x + _attn(L, L.input_layernorm(x), c, s, m)) + L.mlp(L.post_attention_layernorm(x)),
         "the MLP's input is the normalised x (a parallel block); it must be the normalised h, the stream after the attention's residual add",
         "out = h + mlp(post_attention_layernorm(h))"),
        (lambda L, x, c, s, m: ((h := x + _attn(L, L.input_layernorm(x), c, s, m)) + L.mlp(L.post_attention_layernorm(h)), None),
         "the function returns a tuple (like the package's layer, which also returns attention weights); the exercise wants the hidden states alone",
         "return the tensor h + mlp(...)"),
        (lambda L, x, c, s, m: L.post_attention_layernorm(h := x + _attn(L, L.input_layernorm(x), c, s, m)) + L.mlp(L.post_attention_layernorm(h)),
         "the second residual adds the normalised h instead of h itself", "the residual stream carries the un-normalised h: out = h + mlp(norm(h))"),
        (lambda L, x, c, s, m: (h := x + L.input_layernorm(_attn(L, x, c, s, m))) + L.post_attention_layernorm(L.mlp(h)),
         "the norms are applied to the outputs of attention and MLP; Llama normalises their inputs (pre-norm)",
         "h = x + self_attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))"),
        (lambda L, x, c, s, m: (h := x - _attn(L, L.input_layernorm(x), c, s, m)) + L.mlp(L.post_attention_layernorm(h)),
         "the attention output is subtracted from the residual stream (sign); the residual adds it", "h = x + self_attn(input_layernorm(x), ...)[0]"),
        (lambda L, x, c, s, m: (h := x + _attn(L, L.post_attention_layernorm(x), c, s, m)) + L.mlp(L.input_layernorm(h)),
         "the two norms are swapped: input_layernorm goes before the attention, post_attention_layernorm before the MLP",
         "h = x + self_attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))"),
        (lambda L, x, c, s, m: x + L.mlp(L.post_attention_layernorm(x + _attn(L, L.input_layernorm(x), c, s, m))),
         "the second residual adds x, the block's input; it adds h, the stream after the attention", "out = h + mlp(post_attention_layernorm(h))"),
        (lambda L, x, c, s, m: L.mlp(L.post_attention_layernorm(x + _attn(L, L.input_layernorm(x), c, s, m))),
         "the second residual is missing: the MLP output is not added to h", "out = h + mlp(post_attention_layernorm(h))"),
        (lambda L, x, c, s, m: (h := _attn(L, L.input_layernorm(x), c, s, m)) + L.mlp(L.post_attention_layernorm(h)),
         "the first residual is missing: x is not added to the attention output", "h = x + self_attn(input_layernorm(x), ...)[0]"),
        (lambda L, x, c, s, m: (h := x + _attn(L, L.input_layernorm(x), c, s, None)) + L.mlp(L.post_attention_layernorm(h)),
         "the mask is not passed to self_attn (None): with a mask, every token sees the future", "pass `mask` on to layer.self_attn"),
        (lambda L, x, c, s, m: (h := x + _attn(L, L.input_layernorm(x), s, c, m)) + L.mlp(L.post_attention_layernorm(h)),
         "cos and sin are passed to self_attn in the wrong order", "layer.self_attn(normed, cos, sin, mask)"),
    ],
)


register(
    "llama_intermediate_size", "05_feedforward_and_block", "(hidden_size, multiple_of=256, ffn_dim_multiplier=None)",
    "Meta's SwiGLU width: 2/3 of 4 * hidden_size, times ffn_dim_multiplier, rounded up to a multiple of multiple_of",
    reference=swiglu_hidden_size,
    cases=lambda: [("Llama 2 7B", (4096, 256, None)), ("Llama 2 13B", (5120, 256, None)), ("Llama 2 70B", (8192, 4096, 1.3)),
                   ("stories15M", (288, 32, None)), ("stories260K", (64, 4, None)), ("already a multiple", (96, 64, None))],
    mistakes=[
        (lambda d, m=256, f=None: m * (int(int(2 * 4 * d / 3) * (f or 1)) // m),
         "rounded down; Meta rounds up to the next multiple", "multiple_of * ((h + multiple_of - 1) // multiple_of)"),
        (lambda d, m=256, f=None: m * ((int(2 * 4 * d / 3) + m - 1) // m),
         "ffn_dim_multiplier is ignored (70B uses 1.3)", "h = int(ffn_dim_multiplier * h) when it is given, before rounding"),
        (lambda d, m=256, f=None: int((f or 1) * m * ((int(2 * 4 * d / 3) + m - 1) // m)),
         "the multiplier is applied after rounding", "scale first, then round up"),
        (lambda d, m=256, f=None: m * ((int((f or 1) * 4 * d) + m - 1) // m),
         "the 2/3 is missing (SwiGLU keeps the parameter count of a 4d MLP with three matrices instead of two)", "h = int(2 * 4 * hidden_size / 3)"),
        (lambda d, m=256, f=None: int(int(2 * 4 * d / 3) * (f or 1)),
         "not rounded up to a multiple of multiple_of (Meta's code rounds so the matrices tile well on GPUs)",
         "multiple_of * ((h + multiple_of - 1) // multiple_of)"),
        (lambda d, m=256, f=None: m * (int(int(2 * 4 * d / 3) * (f or 1)) // m + 1),
         "one multiple too many when the width already is a multiple (off by one: h // m + 1 rounds 256 up to 320)",
         "multiple_of * ((h + multiple_of - 1) // multiple_of)"),
        (lambda d, m=256, f=None: m * round(int(int(2 * 4 * d / 3) * (f or 1)) / m),
         "rounded to the nearest multiple; Meta rounds up to the next multiple", "multiple_of * ((h + multiple_of - 1) // multiple_of)"),
        (lambda d, m=256, f=None: m * ((int(int(2 * d / 3) * (f or 1)) + m - 1) // m),
         "the factor 4 is missing: the width is 2/3 of 4 * hidden_size", "h = int(2 * 4 * hidden_size / 3)"),
        (lambda d, m=256, f=None: m * ((int(int(2 * 4 * d / 3) / (f or 1)) + m - 1) // m),
         "the width is divided by ffn_dim_multiplier; it multiplies", "h = int(ffn_dim_multiplier * h)"),
    ],
)
