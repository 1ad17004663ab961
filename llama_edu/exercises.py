"""The course's exercises: what the learner writes in each notebook, and a checker that says why
an answer is wrong.

    from llama_edu.exercises import EXERCISES, check
    EXERCISES["rotate_half"].task        # what to write; .notebook, .signature, .reference
    check("rotate_half", my_rotate_half) # True/False, and a printed diagnosis

``check`` runs the learner's function and the reference (always the package's own function, never a
copy) on the exercise's inputs: random ones and adversarial ones chosen to separate near-misses
(tiny norms, fp16 overflow, ties, a cache offset). When an answer differs it runs the exercise's
known mistakes on the same inputs; a mistake that reproduces the learner's every output (or error)
is named, with a hint. Otherwise it says what differs (shape, dtype, NaN, sign, a constant
factor, values in the wrong places). ``check`` never raises: a broken answer must not stop the
notebook. ``check(name, None)``, or a function that raises ``NotImplementedError``, is "not
attempted yet".

How to add an exercise (one self-contained block; copy one of those below)
--------------------------------------------------------------------------
In this file, under the section of your notebook (the ``# === NN_topic ===`` lines near the end),
import the reference from its package module at the top of the file and write::

    def _my_cases():                 # fresh inputs each call: [(label, args), ...]
        g = torch.Generator().manual_seed(0)
        return [("random 3x4", (torch.randn(3, 4, generator=g),)),
                ("fp16 values that overflow x**2", (torch.full((2, 4), 300.0).half(),))]

    register(
        "my_fn", "12_lora", "(x)", "one line saying what to write",
        reference=package_module.my_fn,
        cases=_my_cases,
        mistakes=[  # (a wrong version, the mistake in words, a hint); matched by running it
            (lambda x: ..., "the mistake it makes", "how to fix it"),
        ],
    )

``tests/test_exercises.py`` then checks it automatically (the reference passes, each mistake is
rejected with its own diagnosis, a stub is "not attempted yet"); in your own test file add that a
correct answer written differently passes: ``assert check("my_fn", my_alternative)``. A mistake
must be told apart by the inputs: if two mistakes give the same outputs, the first is named, so
add the input that separates them. Optional arguments: ``atol``/``rtol`` for float comparisons,
``also=fn`` for a check the values cannot show (``also(learner_fn) -> problem or None``; see
greedy_decode). In a notebook: ``check("my_fn", my_fn)`` under the learner's cell, and
``assert check("my_fn", my_fn_solution)`` in the hidden solution cell.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .attention import causal_mask as _package_causal_mask
from .attention import eager_attention, repeat_kv
from .bpe import merge_pair
from .cache import StaticCache
from .config import LlamaConfig
from .convert import permute_qk
from .files import PROJECT_DATA_DIR
from .distributed import Parallel, local_rows
from .dpo import dpo_loss
from .generation import generate
from .lora import lora_forward
from .mlp import LlamaMLP, swiglu_hidden_size
from .model import LlamaDecoderLayer
from .pretraining_tp import SlicedLinear
from .modeling import LlamaForCausalLM
from .quantize import NF4_CODE, absmax_dequantize, absmax_quantize, blockwise_dequantize, blockwise_quantize, pack_codes, unpack_codes
from .rmsnorm import LlamaRMSNorm
from .sampling import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from .rope import LlamaRotaryEmbedding, apply_rotary_pos_emb, dynamic_ntk_base, rope_inv_freq, rotate_half
from .sft import assistant_labels
from .tokenizer import LlamaTokenizer
from .classification import classification_metrics
from .modeling import causal_lm_loss

Cases = list[tuple[str, tuple]]


@dataclass
class Exercise:
    """One exercise: where it is taught, what to write, the package function it must match, the
    inputs it is checked on, and the typical mistakes (wrong function, what it does, hint)."""

    name: str
    notebook: str
    signature: str
    task: str
    reference: Callable
    cases: Callable[[], Cases]
    mistakes: list[tuple[Callable, str, str]] = field(default_factory=list)
    atol: float = 1e-5
    rtol: float = 1e-5
    also: Callable[[Callable], str | None] | None = None


EXERCISES: dict[str, Exercise] = {}


def register(name: str, notebook: str, signature: str, task: str, **kwargs: Any) -> Exercise:
    """Add an exercise to :data:`EXERCISES` (see the module docstring)."""
    if name in EXERCISES:
        raise ValueError(f"an exercise named {name!r} is already registered (notebook {EXERCISES[name].notebook})")
    EXERCISES[name] = Exercise(name, notebook, signature, task, **kwargs)
    return EXERCISES[name]


# ---------------------------------------------------------------------------------------------
# Comparing a result with the expected one, and saying how it differs
# ---------------------------------------------------------------------------------------------


@dataclass
class Raised:
    """What a call raised, so two failing calls can be compared like two results."""

    error: BaseException

    def __str__(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"


def _clone(x: Any) -> Any:
    """Fresh copies of tensors (and lists of them), so an in-place answer cannot spoil the
    reference's inputs; modules, configs and models are passed as they are."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, tuple):
        return tuple(_clone(v) for v in x)
    if isinstance(x, list):
        return [_clone(v) for v in x]
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _call(fn: Callable, args: tuple) -> Any:
    try:
        return fn(*_clone(args))
    except NotImplementedError:
        raise
    except Exception as e:  # an answer's error is a result to diagnose, not a crash
        return Raised(e)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, Raised):
        return f"an error ({x})"
    return f"{type(x).__name__} {x!r}"[:300]


def _tolerance(dtype: torch.dtype, atol: float, rtol: float) -> tuple[float, float]:
    # Half-precision results may differ by a couple of units in the last place when the same
    # formula is evaluated in another order; a real mistake is far larger.
    if dtype in (torch.float16, torch.bfloat16):
        eps = torch.finfo(dtype).eps
        return max(atol, 2 * eps), max(rtol, 2 * eps)
    return atol, rtol


def _tensor_difference(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> str | None:
    if got.shape != expected.shape:
        return f"the {what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    if got.dtype != expected.dtype:
        return f"the {what} has dtype {got.dtype}, expected {expected.dtype}"
    if not expected.is_floating_point():
        bad = got != expected
        if not bad.any():
            return None
        idx = tuple(int(i) for i in bad.nonzero()[0])
        return f"the {what} differs at index {idx}: got {got[idx].item()}, expected {expected[idx].item()} ({int(bad.sum())} of {bad.numel()} differ)"
    atol, rtol = _tolerance(expected.dtype, atol, rtol)
    g, e = got.double(), expected.double()
    bad = ~torch.isclose(g, e, atol=atol, rtol=rtol, equal_nan=True)
    if not bad.any():
        return None
    idx = tuple(int(i) for i in bad.nonzero()[0])
    where = f"({int(bad.sum())} of {bad.numel()} values differ; the first at index {idx}: got {g[idx].item():.6g}, expected {e[idx].item():.6g})"
    if torch.isnan(g).any() and not torch.isnan(e).any():
        return f"the {what} contains NaN where the expected values are numbers {where}. NaN comes from an overflow (exp of a large number, or x**2 in float16 -> inf, then inf/inf) or from 0/0"
    if torch.isinf(g).any() and not torch.isinf(e).any():
        return f"the {what} contains inf where the expected values are finite {where}: something overflowed"
    finite = torch.isfinite(e) & torch.isfinite(g)
    if finite.all() and torch.allclose(g, -e, atol=atol, rtol=rtol):
        return f"every value of the {what} has the wrong sign {where}"
    if finite.all() and e.abs().max() > 0:
        ratio = (g * e).sum() / (e * e).sum()
        if abs(ratio - 1) > 1e-3 and torch.allclose(g, ratio * e, atol=atol, rtol=1e-3):
            return f"the {what} is the expected one times {ratio.item():.4g} {where}: a scale factor is off"
    if got.numel() > 1 and torch.allclose(g.flatten().sort().values, e.flatten().sort().values, atol=atol, rtol=rtol, equal_nan=True):
        return f"the {what} has the right values in the wrong places {where}: an index, a transpose or a reshape is off"
    return f"the {what} differs {where}"


def difference(got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-5, what: str = "result") -> str | None:
    """``None`` when ``got`` matches ``expected`` (tensors, numbers, strings, or tuples/lists of
    them), else a sentence saying how it differs."""
    if isinstance(got, Raised) or isinstance(expected, Raised):
        return None if str(got) == str(expected) else f"the {what} is {_describe(got)}, expected {_describe(expected)}"
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"the {what} should be a tensor, got {_describe(got)}"
        return _tensor_difference(got, expected, atol, rtol, what)
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"the {what} should be a {type(expected).__name__} of {len(expected)} items, got {_describe(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            problem = difference(g, e, atol, rtol, f"{what}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(expected, str):
        if not isinstance(got, str):
            return f"the {what} should be a string, got {_describe(got)}"
        if got == expected:
            return None
        i = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        return (f"the {what} differs from character {i} on: got {got[max(0, i - 15):i + 25]!r}, expected "
                f"{expected[max(0, i - 15):i + 25]!r}")
    if isinstance(expected, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return None if math.isclose(got, expected, rel_tol=max(rtol, 1e-9), abs_tol=atol) else f"the {what} is {got!r}, expected {expected!r}"
    if isinstance(expected, int) and isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if got != expected:
        return f"the {what} is {_describe(got)}, expected {_describe(expected)}"
    return None


# ---------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------


def _not_attempted(name: str) -> bool:
    print(f"{name}: not attempted yet. Write your function in the cell above (replace the `raise NotImplementedError`), run it, then run this check again.")
    return False


def _matching_mistake(ex: Exercise, cases: Cases, answers: list[Any]) -> tuple[str, str] | None:
    """The first known mistake that reproduces every one of the learner's answers."""
    for wrong, says, hint in ex.mistakes:
        try:
            if all(difference(ans, _call(wrong, args), ex.atol, ex.rtol) is None for (_, args), ans in zip(cases, answers)):
                return says, hint
        except NotImplementedError:
            continue
    return None


def check(name: str, fn: Callable | None) -> bool:
    """Run the learner's ``fn`` for exercise ``name`` on all its inputs and compare with the
    reference. Prints "not attempted yet", a diagnosis (which input, what differs, the likely
    mistake and a hint) or "correct"; returns True only when every input gives the expected
    result. Never raises."""
    try:
        ex = EXERCISES.get(name)
        if ex is None:
            print(f"check: there is no exercise called {name!r}; the exercises are: {', '.join(sorted(EXERCISES))}")
            return False
        if fn is None:
            return _not_attempted(name)
        with torch.no_grad():
            cases = ex.cases()
            answers = []
            for _, args in cases:
                try:
                    answers.append(_call(fn, args))
                except NotImplementedError:
                    return _not_attempted(name)
            for n, ((label, args), ans) in enumerate(zip(cases, answers), start=1):
                expected = _call(ex.reference, args)
                if isinstance(expected, Raised):  # a bug in the exercise, not in the answer
                    print(f"{name}: the checker itself failed on case {n} ({label}): {expected}. Please report this.")
                    return False
                if ans is None and expected is not None:
                    print(f"{name}: case {n} of {len(cases)} ({label}) returned None. Did you forget the `return`?")
                    return False
                problem = difference(ans, expected, ex.atol, ex.rtol)
                if problem is None:
                    continue
                print(f"{name}: not right yet. Case {n} of {len(cases)} ({label}):")
                if isinstance(ans, Raised):
                    print(f"  your function raised {ans}")
                    if isinstance(ans.error, TypeError) and "argument" in str(ans.error):
                        print(f"  It must take the arguments {name}{ex.signature}.")
                else:
                    print(f"  {problem}.")
                mistake = _matching_mistake(ex, cases, answers)
                if mistake:
                    print(f"  Likely mistake: {mistake[0]}.")
                    print(f"  Hint: {mistake[1]}.")
                elif not isinstance(ans, Raised):
                    print("  Compare your steps with the formula above, on this input, one line at a time.")
                return False
            if ex.also is not None:
                problem = ex.also(fn)
                if problem:
                    print(f"{name}: the values are right, but {problem}.")
                    return False
        print(f"{name}: correct on all {len(cases)} cases ({', '.join(label for label, _ in cases)}).")
        return True
    except Exception as e:  # never stop the learner's notebook because of the checker
        print(f"{name}: the checker could not finish ({type(e).__name__}: {e}).")
        return False


def check_function(learner_fn: Callable | None, reference_fn: Callable, inputs: list[tuple], name: str = "your function",
                   atol: float = 1e-5, rtol: float = 1e-5) -> bool:
    """Compare ``learner_fn(*args)`` with ``reference_fn(*args)`` for ad-hoc inputs, without a
    registered exercise (no diagnosis of mistakes). Prefer :func:`check`."""
    if learner_fn is None:
        return _not_attempted(name)
    try:
        for n, args in enumerate(inputs, start=1):
            got, expected = _call(learner_fn, args), _call(reference_fn, args)
            problem = difference(got, expected, atol, rtol)
            if problem:
                print(f"{name}: case {n} of {len(inputs)}: {problem}.")
                return False
    except NotImplementedError:
        return _not_attempted(name)
    print(f"{name}: correct on all {len(inputs)} cases.")
    return True


def list_exercises(notebook: str | None = None) -> None:
    """Print the exercises (of one notebook, e.g. ``"03"``, or all): name, signature, task."""
    for ex in EXERCISES.values():
        if notebook is None or ex.notebook.startswith(notebook):
            print(f"{ex.notebook:28s} {ex.name}{ex.signature}: {ex.task}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# =============================================================================================
# === 00_course_map ===
# =============================================================================================


def _softmax_cases() -> Cases:
    g = _gen(0)
    return [
        ("three logits", (torch.tensor([2.0, 1.0, 0.1]), -1)),
        ("random 3x7 over dim=1", (torch.randn(3, 7, generator=g), 1)),
        ("random 4x5 over dim=0", (torch.randn(4, 5, generator=g), 0)),
        ("logits around 1000", (torch.tensor([[1000.0, 1001.0, 1002.0], [-5.0, 0.0, 5.0]]), -1)),
        ("float16 logits up to 40 (exp overflows float16)", (torch.tensor([[40.0, 38.0, 0.0, -3.0]]).half(), -1)),
        ("a masked logit (-inf)", (torch.tensor([[0.5, float("-inf"), 1.5]]), -1)),
    ]


register(
    "softmax", "00_course_map", "(x, dim)", "softmax along `dim`, stable for large inputs",
    reference=torch.softmax,
    cases=_softmax_cases,
    mistakes=[
        (lambda x, dim: x.exp() / x.exp().sum(dim, keepdim=True),
         "exp(x) overflows for large inputs (exp(1000) = inf in float32, exp(12) already > 65504 in float16), and inf/inf = NaN",
         "subtract the maximum along `dim` first (x - x.max(dim, keepdim=True).values): it cancels in the ratio, and the largest exponent becomes exp(0) = 1"),
        (lambda x, dim: torch.softmax(x, -1),
         "you normalised over the last dimension whatever `dim` says", "use `dim` in max and sum"),
        (lambda x, dim: (x - x.max()).exp() / (x - x.max()).exp().sum(),
         "you divided by the sum of all the elements, not the sum along `dim`", "e.sum(dim, keepdim=True)"),
        (lambda x, dim: (x - x.max(dim, keepdim=True).values).exp() / (x - x.max(dim, keepdim=True).values).exp().sum(dim),
         "the sum lost its dimension, so it broadcast against the wrong axis", "sum with keepdim=True"),
    ],
)


# =============================================================================================
# === 01_tokenizer ===
# =============================================================================================


def _merge_pair_cases() -> Cases:
    return [
        ("a word start", (["▁", "t", "h", "e"], ("▁", "t"))),
        ("odd run of a pair", (["a", "a", "a"], ("a", "a"))),
        ("even run of a pair", (["a", "a", "a", "a"], ("a", "a"))),
        ("two occurrences", (["▁t", "h", "e", "▁t", "h"], ("▁t", "h"))),
        ('multi-character symbols ["xa", "b"]', (["xa", "b"], ("a", "b"))),
        ("symbols that are spaces", (["a", " ", "b", " ", "b"], (" ", "b"))),
        ("one symbol", (["x"], ("x", "y"))),
        ("no symbols", ([], ("a", "b"))),
    ]


def _merge_by_string_replace(symbols, pair):
    return " ".join(symbols).replace(" ".join(pair), "".join(pair)).split(" ") if symbols else []


def _merge_first_only(symbols, pair):
    for i in range(len(symbols) - 1):
        if (symbols[i], symbols[i + 1]) == tuple(pair):
            return symbols[:i] + [pair[0] + pair[1]] + symbols[i + 2:]
    return list(symbols)


def _merge_right_to_left(symbols, pair):
    merged, i = [], len(symbols) - 1
    while i >= 0:
        if i - 1 >= 0 and (symbols[i - 1], symbols[i]) == tuple(pair):
            merged.insert(0, pair[0] + pair[1])
            i -= 2
        else:
            merged.insert(0, symbols[i])
            i -= 1
    return merged


def _merge_no_skip(symbols, pair):
    merged = []
    for i, s in enumerate(symbols):
        if i + 1 < len(symbols) and (s, symbols[i + 1]) == tuple(pair):
            merged.append(pair[0] + pair[1])
        elif not (i > 0 and (symbols[i - 1], s) == tuple(pair)):
            merged.append(s)
    return merged


register(
    "merge_pair", "01_tokenizer", "(symbols, pair)",
    "replace every non-overlapping occurrence of the pair, left to right, by the joined symbol",
    reference=merge_pair,
    cases=_merge_pair_cases,
    mistakes=[
        (_merge_by_string_replace,
         "you merged on the joined string: in ['xa', 'b'] the text 'a b' appears although no symbol is 'a', and symbols that are spaces break the split",
         "walk the list of symbols and compare whole symbols: (symbols[i], symbols[i + 1]) == pair"),
        (_merge_first_only, "only the first occurrence is merged", "keep going after a merge until the end of the list"),
        (_merge_right_to_left, "you scan from the right: in ['a', 'a', 'a'] the merge must take the first two",
         "go left to right, and after a merge jump over both symbols (i += 2)"),
        (_merge_no_skip, "after a merge you do not jump over the second symbol, so runs like ['a', 'a', 'a'] merge overlapping pairs",
         "after appending the merged symbol, advance by 2"),
    ],
)


# =============================================================================================
# === 02_embeddings_and_rmsnorm ===
# =============================================================================================


def _rms_norm_reference(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = LlamaRMSNorm(weight.shape[0], eps).to(weight.dtype)
    norm.weight.data = weight
    return norm(hidden_states)


def _rms_norm_cases() -> Cases:
    g = _gen(1)
    return [
        ("random (2, 3, 16)", (torch.randn(2, 3, 16, generator=g), torch.rand(16, generator=g) + 0.5, 1e-6)),
        ("large values x100", (torch.randn(5, 64, generator=g) * 100, torch.rand(64, generator=g), 1e-5)),
        ("tiny norms (values ~1e-3, eps 1e-5)", (torch.randn(4, 32, generator=g) * 1e-3, torch.rand(32, generator=g) + 0.5, 1e-5)),
        ("an all-zero row", (torch.zeros(2, 8), torch.ones(8), 1e-6)),
        ("float16 values ~300 (x**2 overflows float16)", ((torch.randn(3, 32, generator=g) * 300).half(), (torch.rand(32, generator=g) + 0.5).half(), 1e-6)),
        ("bfloat16", (torch.randn(4, 32, generator=g).bfloat16(), torch.rand(32, generator=g).bfloat16(), 1e-6)),
    ]


register(
    "rms_norm", "02_embeddings_and_rmsnorm", "(hidden_states, weight, eps)",
    "RMSNorm over the last dimension, computed in float32 and cast back to the input dtype, times weight",
    reference=_rms_norm_reference,
    cases=_rms_norm_cases,
    mistakes=[
        (lambda h, w, eps: w * (h.float() / (h.float().pow(2).mean(-1, keepdim=True).sqrt() + eps)).to(h.dtype),
         "eps is added outside the square root: x / (sqrt(mean(x^2)) + eps)",
         "eps belongs inside: x * rsqrt(mean(x^2) + eps); it matters when the norm is tiny"),
        (lambda h, w, eps: w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)),
         "no float32 upcast: in float16, 300**2 = 90000 overflows to inf (the largest float16 is 65504)",
         "compute in float32 (x = hidden_states.float()) and cast back with .to(hidden_states.dtype) before multiplying by weight"),
        (lambda h, w, eps: w * (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True))).to(h.dtype),
         "no eps: an all-zero row gives 0/0 = NaN", "add eps inside the square root"),
        (lambda h, w, eps: w * F.layer_norm(h.float(), h.shape[-1:], eps=eps).to(h.dtype),
         "that is LayerNorm: RMSNorm does not subtract the mean", "divide by the root of the mean of squares, without centring"),
        (lambda h, w, eps: w * (h.float() * torch.rsqrt(h.float().pow(2).sum(-1, keepdim=True) + eps)).to(h.dtype),
         "you used the sum of squares instead of the mean", "use .mean(-1, keepdim=True)"),
        (lambda h, w, eps: (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype),
         "the learned gain `weight` is missing", "multiply the normalised values by weight"),
    ],
)


# =============================================================================================
# === 03_rope ===
# =============================================================================================


def _rotate_half_cases() -> Cases:
    g = _gen(2)
    return [
        ("arange(6)", (torch.arange(6.0),)),
        ("random (2, 3, 5, 8)", (torch.randn(2, 3, 5, 8, generator=g),)),
        ("float16 (1, 4, 7, 128)", (torch.randn(1, 4, 7, 128, generator=g).half(),)),
    ]


def _halves(x):
    return x.chunk(2, dim=-1)


register(
    "rotate_half", "03_rope", "(x)", "(x1, x2) -> (-x2, x1) on the two halves of the last dimension",
    reference=rotate_half,
    cases=_rotate_half_cases,
    mistakes=[
        (lambda x: torch.cat((_halves(x)[1], -_halves(x)[0]), -1),
         "the sign is on the wrong half: (x2, -x1) rotates by -90 degrees",
         "the first half of the output is -x2, the second half x1"),
        (lambda x: torch.cat((_halves(x)[1], _halves(x)[0]), -1), "the halves are swapped but nothing is negated",
         "a 90-degree rotation of (a, b) is (-b, a)"),
        (lambda x: torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2),
         "you rotated neighbouring pairs (2i, 2i+1), Meta's complex layout; Hugging Face's weights pair i with i + d/2",
         "split into the first and second halves: x1, x2 = x.chunk(2, dim=-1)"),
        (lambda x: torch.cat((-_halves(x)[0], _halves(x)[1]), -1), "the halves are not swapped",
         "output = cat(-x2, x1)"),
    ],
)


def _rope_inputs(g, batch, heads, kv_heads, seq, dim, offset=0, base=10000.0, dtype=torch.float32):
    positions = torch.arange(offset, offset + seq)[None].expand(batch, seq)
    cos, sin = LlamaRotaryEmbedding(dim, base=base)(positions, offset + seq, dtype)
    q = torch.randn(batch, heads, seq, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g).to(dtype)
    return q, k, cos, sin


def _apply_rope_cases() -> Cases:
    g = _gen(3)
    return [
        ("batch 2, 4 heads, 2 kv heads, 5 positions", _rope_inputs(g, 2, 4, 2, 5, 8)),
        ("batch 3, 3 heads, 3 kv heads (batch = heads)", _rope_inputs(g, 3, 3, 3, 4, 16)),
        ("positions 100..106 (a cache offset)", _rope_inputs(g, 1, 2, 1, 6, 32, offset=100)),
        ("float16", _rope_inputs(g, 1, 4, 4, 3, 64, dtype=torch.float16)),
    ]


def _rope_minus(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos - rotate_half(q) * sin, k * cos - rotate_half(k) * sin


def _rope_no_unsqueeze(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _rope_cos_sin_swapped(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * sin + rotate_half(q) * cos, k * sin + rotate_half(k) * cos


def _rope_q_only(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k


register(
    "apply_rotary_pos_emb", "03_rope", "(q, k, cos, sin)",
    "rotate q (b, heads, seq, d) and k (b, kv_heads, seq, d) by cos/sin (b, seq, d), unsqueezed at dim 1",
    reference=apply_rotary_pos_emb,
    cases=_apply_rope_cases,
    mistakes=[
        (_rope_minus, "the sine term has the wrong sign: q*cos - rotate_half(q)*sin rotates backwards",
         "q_embed = q * cos + rotate_half(q) * sin (rotate_half already holds the minus)"),
        (_rope_no_unsqueeze, "cos and sin were not unsqueezed at dim 1, so (b, seq, d) broadcast against (heads, seq, d): batch lined up with heads",
         "cos, sin = cos.unsqueeze(1), sin.unsqueeze(1) gives (b, 1, seq, d), shared by all heads"),
        (_rope_cos_sin_swapped, "cos and sin are swapped", "x * cos + rotate_half(x) * sin"),
        (_rope_q_only, "only q is rotated; k must be rotated too (by its own position)", "apply the same formula to k"),
    ],
)


register(
    "rope_inv_freq", "03_rope", "(head_dim, base)",
    "the rotation frequencies theta_i = base^(-2i/d), i = 0 .. d/2 - 1, as float32 of shape (head_dim // 2,)",
    reference=rope_inv_freq,
    cases=lambda: [("head_dim 8", (8, 10000.0)), ("head_dim 128 (Llama 2)", (128, 10000.0)),
                   ("base 500000", (64, 500000.0)), ("head_dim 2", (2, 10000.0))],
    mistakes=[
        (lambda d, base: 1.0 / base ** (torch.arange(0, d // 2).float() / d),
         "the exponent is i/d instead of 2i/d, so the slowest rotation is far too fast",
         "use torch.arange(0, head_dim, 2) / head_dim (0, 2/d, 4/d, ...)"),
        (lambda d, base: base ** (torch.arange(0, d, 2).float() / d),
         "base^(+2i/d) is the wavelength factor, not the frequency", "take 1 / base^(2i/d)"),
        (lambda d, base: 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d),
         "the result is float64", "compute the exponents in float32 (torch.arange(...).float())"),
    ],
)


def _rope_cos_sin_reference(position_ids: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    return LlamaRotaryEmbedding(head_dim, base=base)(position_ids, int(position_ids.max()) + 1, torch.float32)


register(
    "rope_cos_sin", "03_rope", "(position_ids, head_dim, base)",
    "cos and sin (batch, seq, head_dim) of the angles position * theta_i, laid out as in rotate_half (i and i + d/2 share theta_i)",
    reference=_rope_cos_sin_reference,
    cases=lambda: [("positions 0..5", (torch.arange(6)[None], 8, 10000.0)),
                   ("batch of 2, positions 10..13", (torch.arange(10, 14)[None].repeat(2, 1), 16, 10000.0)),
                   ("position 4000, head_dim 128", (torch.tensor([[0, 1, 4000]]), 128, 10000.0))],
    mistakes=[
        (lambda p, d, base: tuple(f(torch.repeat_interleave(p[..., None].float() * rope_inv_freq(d, base), 2, -1)) for f in (torch.cos, torch.sin)),
         "each frequency is repeated in neighbouring slots (2i, 2i+1), Meta's complex layout; rotate_half pairs i with i + d/2",
         "emb = torch.cat((freqs, freqs), dim=-1)"),
        (lambda p, d, base: tuple(f(p[..., None].float() * rope_inv_freq(d, base)) for f in (torch.cos, torch.sin)),
         "the angles cover only head_dim / 2 slots", "concatenate the angles with themselves: cat((freqs, freqs), -1)"),
    ],
)


register(
    "dynamic_ntk_base", "03_rope", "(base, head_dim, seq_len, max_position_embeddings, factor)",
    "the rotary base dynamic-NTK scaling uses for a sequence of seq_len tokens (unchanged up to the training context)",
    reference=dynamic_ntk_base,
    cases=lambda: [("inside the context", (10000.0, 128, 2048, 4096, 2.0)), ("at the context", (10000.0, 128, 4096, 4096, 2.0)),
                   ("twice the context", (10000.0, 128, 8192, 4096, 2.0)), ("small head, factor 4", (10000.0, 16, 300, 256, 4.0))],
    mistakes=[
        (lambda b, d, L, Lt, f: b * ((f * L / Lt) - (f - 1)) ** (d / (d - 2)),
         "the base also changes inside the training context (at L = 2048 of 4096 the formula gives a smaller base)",
         "return base unchanged while seq_len <= max_position_embeddings"),
        (lambda b, d, L, Lt, f: b if L <= Lt else b * ((f * L / Lt) - (f - 1)),
         "the exponent d / (d - 2) is missing", "raise the length factor to head_dim / (head_dim - 2)"),
        (lambda b, d, L, Lt, f: b if L <= Lt else b * (f * L / Lt) ** (d / (d - 2)),
         "the '- (factor - 1)' term is missing, so the base jumps as soon as the context is exceeded",
         "use (factor * seq_len / max_position_embeddings) - (factor - 1)"),
    ],
)


# =============================================================================================
# === 04_attention ===
# =============================================================================================


def _causal_mask_reference(q_len: int, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """The package's boolean mask for q_len new tokens after kv_len - q_len cached ones, made additive."""
    allowed = _package_causal_mask(torch.arange(kv_len - q_len, kv_len), kv_len)[0, 0]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _mask_from(allowed: torch.Tensor, dtype: torch.dtype, fill: float | None = None) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min if fill is None else fill)


def _positions(q_len, kv_len):
    return torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]


register(
    "causal_mask", "04_attention", "(q_len, kv_len, dtype)",
    "the (q_len, kv_len) additive mask: 0 where key j <= query i + (kv_len - q_len), torch.finfo(dtype).min elsewhere",
    reference=_causal_mask_reference,
    cases=lambda: [("4 queries, 4 keys", (4, 4, torch.float32)), ("1 query after 5 cached keys", (1, 6, torch.float32)),
                   ("3 queries after 5 cached keys", (3, 8, torch.float32)), ("float16, 5x5", (5, 5, torch.float16)),
                   ("bfloat16, 2 queries, 7 keys", (2, 7, torch.bfloat16))],
    mistakes=[
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] <= _positions(q, k)[0], dt),
         "the cache offset is ignored: with kv_len > q_len, query i is token (kv_len - q_len) + i and sees all the cached keys",
         "allow key j when j <= i + (kv_len - q_len)"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] < _positions(q, k)[0] + (k - q), dt),
         "off by one: each query is masked from its own key (j < i instead of j <= i)", "use <=: a token attends to itself"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] <= _positions(q, k)[0] + (k - q) + 1, dt),
         "off by one: each query also sees the next token", "use j <= i + (kv_len - q_len), not + 1"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] <= _positions(q, k)[0] + (k - q), dt, float("-inf")),
         "-inf instead of torch.finfo(dtype).min: a row with nothing to attend to (left padding) becomes NaN after softmax",
         "masked_fill with torch.finfo(dtype).min"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] >= _positions(q, k)[0] + (k - q), dt),
         "the mask is upside down: queries see the future and not the past", "allow keys at or before the query's position"),
        (lambda q, k, dt: _mask_from(_positions(q, k)[1] <= _positions(q, k)[0] + (k - q), torch.float32),
         "the mask is always float32; it must be in `dtype` (and use that dtype's min)", "torch.zeros(..., dtype=dtype) and torch.finfo(dtype).min"),
    ],
)


def _repeat_kv_cases() -> Cases:
    g = _gen(4)
    return [
        ("2 kv heads, n_rep 3", (torch.randn(1, 2, 3, 4, generator=g), 3)),
        ("batch 2, 4 kv heads, n_rep 2", (torch.randn(2, 4, 5, 8, generator=g), 2)),
        ("n_rep 1 (plain multi-head)", (torch.randn(1, 3, 2, 4, generator=g), 1)),
        ("1 kv head (multi-query), n_rep 4", (torch.randn(1, 1, 4, 8, generator=g), 4)),
    ]


register(
    "repeat_kv", "04_attention", "(hidden_states, n_rep)",
    "(b, kv_heads, seq, d) -> (b, kv_heads * n_rep, seq, d): each kv head repeated for its n_rep query heads",
    reference=repeat_kv,
    cases=_repeat_kv_cases,
    mistakes=[
        (lambda h, n: h.repeat(1, n, 1, 1),
         "`repeat` tiles the heads (0, 1, 0, 1): query head 1 gets kv head 1 instead of kv head 0",
         "consecutive query heads share a kv head: use repeat_interleave(n_rep, dim=1), or expand a new axis after the kv-head axis and reshape"),
        (lambda h, n: h.repeat_interleave(n, dim=2),
         "you repeated along the sequence axis (dim 2)", "repeat along the head axis, dim 1"),
        (lambda h, n: h.repeat_interleave(n, dim=0),
         "you repeated along the batch axis (dim 0)", "repeat along the head axis, dim 1"),
    ],
)


def _attention_reference(q, k, v, mask):
    return eager_attention(q, k, v, mask == 0)[0]  # the package takes the mask as booleans (True = attend)


def _attention_cases() -> Cases:
    g = _gen(5)

    def qkv(b, h, q_len, kv_len, d, scale=1.0, dtype=torch.float32):
        q = (torch.randn(b, h, q_len, d, generator=g) * scale).to(dtype)
        k = (torch.randn(b, h, kv_len, d, generator=g) * scale).to(dtype)
        v = torch.randn(b, h, kv_len, d, generator=g).to(dtype)
        return q, k, v, _causal_mask_reference(q_len, kv_len, dtype)

    return [
        ("4 tokens, causal", qkv(1, 2, 4, 4, 8)),
        ("batch 2, 3 heads, 6 tokens, head_dim 16", qkv(2, 3, 6, 6, 16)),
        ("3 new queries after 5 cached keys", qkv(1, 2, 3, 8, 8)),
        ("one query (decoding), 7 keys", qkv(2, 2, 1, 7, 32)),
        ("large scores (x4)", qkv(1, 1, 5, 5, 64, scale=4.0)),
        ("float16", qkv(1, 2, 5, 5, 16, dtype=torch.float16)),
    ]


def _scores(q, k):
    return q @ k.transpose(-2, -1)


register(
    "attention", "04_attention", "(q, k, v, mask)",
    "softmax(q k^T / sqrt(d) + mask) v with the softmax in float32 over the keys; q (b, h, q_len, d), k/v (b, h, kv_len, d)",
    reference=_attention_reference,
    cases=_attention_cases,
    mistakes=[
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]) + m, dim=-2, dtype=torch.float32).to(q.dtype) @ v,
         "the softmax runs over the queries (dim=-2): each key's column sums to 1 instead of each query's row",
         "softmax over the last dimension, the keys: every query distributes its attention over the keys"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) + m, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the scores are not divided by sqrt(d), so the softmax is too peaked", "divide q k^T by math.sqrt(head_dim)"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / q.shape[-1] + m, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the scores are divided by d instead of sqrt(d)", "use math.sqrt(q.shape[-1])"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]), dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the mask is not applied: queries see future tokens", "add the mask to the scores before the softmax"),
        (lambda q, k, v, m: F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]) * m, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
         "the mask is multiplied; it is additive (0 keeps a score, a huge negative number removes it)", "scores + mask"),
        (lambda q, k, v, m: (F.softmax(_scores(q, k) / math.sqrt(q.shape[-1]) + m, dim=-1, dtype=torch.float32).to(q.dtype) @ v).transpose(1, 2),
         "the output is transposed to (b, q_len, h, d)", "return weights @ v, shape (b, h, q_len, d)"),
    ],
)


def _kv_cache_bytes_reference(config: LlamaConfig, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    cache = StaticCache(config, batch_size, seq_len, device="meta", dtype=dtype)
    return sum(t.numel() * t.element_size() for t in cache.key_cache + cache.value_cache)


def _kv_bytes(c, b, s, dt, heads=None, kv=2, layers=None):
    heads = c.num_key_value_heads if heads is None else heads
    layers = c.num_hidden_layers if layers is None else layers
    return kv * layers * b * heads * s * c.head_dim * torch.empty(0, dtype=dt).element_size()


register(
    "kv_cache_bytes", "04_attention", "(config, batch_size, seq_len, dtype)",
    "bytes the keys and values of every layer take for batch_size sequences of seq_len tokens",
    reference=_kv_cache_bytes_reference,
    cases=lambda: [("Llama 2 7B, fp16, 4096 tokens", (LlamaConfig.from_preset("llama2-7b"), 1, 4096, torch.float16)),
                   ("Llama 2 70B (8 kv heads), bf16, batch 4", (LlamaConfig.from_preset("llama2-70b"), 4, 2048, torch.bfloat16)),
                   ("stories260K, float32", (LlamaConfig.from_preset("stories260k"), 2, 512, torch.float32))],
    mistakes=[
        (lambda c, b, s, dt: _kv_bytes(c, b, s, dt, heads=c.num_attention_heads),
         "you counted num_attention_heads; the cache holds only num_key_value_heads (grouped-query attention)",
         "use config.num_key_value_heads"),
        (lambda c, b, s, dt: _kv_bytes(c, b, s, dt, kv=1), "only the keys (or only the values) are counted", "multiply by 2: keys and values"),
        (lambda c, b, s, dt: _kv_bytes(c, b, s, dt, layers=1), "one layer only", "every layer has its own cache: multiply by num_hidden_layers"),
        (lambda c, b, s, dt: _kv_bytes(c, b, s, torch.float32), "4 bytes per value whatever the dtype", "use torch.empty(0, dtype=dtype).element_size()"),
    ],
)


# =============================================================================================
# === 05_feedforward_and_block ===
# =============================================================================================


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

    def inputs(b, s, masked=True):
        cos, sin = LlamaRotaryEmbedding(8)(torch.arange(s)[None].expand(b, s), s, torch.float32)
        mask = _package_causal_mask(torch.arange(s), s) if masked else None  # (1, 1, s, s), True = attend
        return layer, torch.randn(b, s, 32, generator=g) * 3, cos, sin, mask

    return [("1 sequence of 5 tokens", inputs(1, 5)), ("batch 2 of 7 tokens", inputs(2, 7)),
            ("mask None (the kernel's causal flag)", inputs(1, 4, masked=False))]


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
    ],
)


# =============================================================================================
# === 06_full_model ===
# =============================================================================================


def _count_reference(config: LlamaConfig) -> int:
    return _count_on_meta(config.to_json_string())


@functools.lru_cache(maxsize=16)
def _count_on_meta(config_json: str) -> int:  # building a 70B model, even on meta, takes a second
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig.from_dict(json.loads(config_json))).num_parameters()


def _count(c, kv=None, norms=True, final=True, tied_twice=False):
    d, hd, L = c.hidden_size, c.head_dim, c.num_hidden_layers
    kv = c.num_key_value_heads if kv is None else kv
    attention = 2 * d * c.num_attention_heads * hd + 2 * d * kv * hd
    per_layer = attention + 3 * d * c.intermediate_size + (2 * d if norms else 0)
    head = 0 if c.tie_word_embeddings and not tied_twice else c.vocab_size * d
    return c.vocab_size * d + L * per_layer + (d if final else 0) + head


register(
    "count_parameters", "06_full_model", "(config)", "the number of parameters of LlamaForCausalLM(config), a tied head counted once",
    reference=_count_reference,
    cases=lambda: [(n, (LlamaConfig.from_preset(n),)) for n in ["tiny", "stories260k", "llama2-7b", "llama2-70b"]]
    + [("tiny with tied embeddings", (LlamaConfig.from_preset("tiny", tie_word_embeddings=True),))],
    mistakes=[
        (lambda c: _count(c, kv=c.num_attention_heads),
         "k_proj and v_proj are counted with num_attention_heads; with grouped-query attention (70B) they have num_key_value_heads * head_dim rows",
         "k and v: hidden_size * num_key_value_heads * head_dim each"),
        (lambda c: _count(c, norms=False), "the two RMSNorm weights of each layer are missing", "add 2 * hidden_size per layer"),
        (lambda c: _count(c, final=False), "the final norm is missing", "add hidden_size for model.norm"),
        (lambda c: _count(c, tied_twice=True), "a tied LM head is counted twice; it is the embedding matrix", "no head when tie_word_embeddings"),
    ],
)


# =============================================================================================
# === 07_loading_real_weights ===
# =============================================================================================


def _permute_cases() -> Cases:
    g = _gen(9)
    return [("one head of 8 rows", (torch.randn(8, 3, generator=g), 1)), ("4 heads of 8", (torch.randn(32, 16, generator=g), 4)),
            ("8 heads of 8", (torch.randn(64, 64, generator=g), 8))]


register(
    "permute_qk", "07_loading_real_weights", "(w, n_heads)",
    "reorder the rows of a q/k weight, head by head, from Meta's interleaved pairs to Hugging Face's halves",
    reference=permute_qk,
    cases=_permute_cases,
    mistakes=[
        (lambda w, n: w.view(n, 2, w.shape[0] // n // 2, w.shape[1]).transpose(1, 2).reshape(w.shape),
         "that is the inverse (Hugging Face -> Meta)", "view as (heads, head_dim // 2, 2, in): pairs first, then re/im"),
        (lambda w, n: w.view(w.shape[0] // 2, 2, w.shape[1]).transpose(0, 1).reshape(w.shape),
         "the whole matrix is permuted at once; each head must be permuted on its own", "view as (n_heads, head_dim // 2, 2, in_features)"),
    ],
)


# =============================================================================================
# === 08_generation ===
# =============================================================================================


@functools.lru_cache(maxsize=1)
def _decode_model() -> LlamaForCausalLM:
    """A small random model with decisive logits (large init) and no end-of-sequence token, so
    greedy decoding always runs max_new_tokens steps."""
    torch.manual_seed(0)
    config = LlamaConfig.from_preset("tiny", eos_token_id=None, initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


def _greedy_reference(model, input_ids, max_new_tokens):
    return generate(model, input_ids, max_new_tokens=max_new_tokens, do_sample=False)


def _greedy_cases() -> Cases:
    m = _decode_model()
    g = _gen(10)
    return [("a prompt of 5 tokens, 6 new", (m, torch.randint(0, 128, (1, 5), generator=g), 6)),
            ("batch of 2 prompts, 4 new", (m, torch.randint(0, 128, (2, 3), generator=g), 4)),
            ("one new token", (m, torch.randint(0, 128, (1, 7), generator=g), 1))]


def _greedy_no_cache(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], -1)
    return ids


def _greedy_first_position(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, 0].argmax(-1, keepdim=True)], -1)
    return ids


def _tokens_through(model, fn, args) -> int:
    """How many token positions went through the model while ``fn(*args)`` ran."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-1]))
    try:
        fn(*_clone(args))
    finally:
        hook.remove()
    return sum(seen)


def _greedy_uses_cache(fn) -> str | None:
    model, ids, n = _greedy_cases()[0][1]
    got = _tokens_through(model, fn, (model, ids, n))
    needed = ids.shape[1] + n - 1
    if got > needed:
        return (f"the model read {got} token positions where {needed} are enough: each step recomputes the whole sequence. "
                "Keep out.past_key_values from the previous call and feed only the new token: "
                "model(next_token, past_key_values=past, use_cache=True)")
    return None


register(
    "greedy_decode", "08_generation", "(model, input_ids, max_new_tokens)",
    "prompt + max_new_tokens greedy tokens, using the KV cache, equal to generate(do_sample=False)",
    reference=_greedy_reference,
    cases=_greedy_cases,
    also=_greedy_uses_cache,
    mistakes=[
        (lambda m, ids, n: _greedy_no_cache(m, ids, n)[:, ids.shape[1]:],
         "only the new tokens are returned; generate returns the prompt followed by them", "torch.cat([input_ids, new_tokens], dim=-1)"),
        (lambda m, ids, n: _greedy_no_cache(m, ids, n - 1) if n > 1 else ids,
         "one token short", "the loop must produce max_new_tokens tokens: the prefill's logits already give the first one"),
        (lambda m, ids, n: _greedy_no_cache(m, ids, n + 1), "one token too many", "stop after max_new_tokens tokens"),
        (_greedy_first_position, "the next token is read from the logits of the first position",
         "the prediction for the next token is at the last position: logits[:, -1]"),
    ],
)


def _top_p_reference(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    return TopPLogitsWarper(top_p)(None, logits.clone())


def _top_p_cases() -> Cases:
    g = _gen(11)
    exact = torch.tensor([[0.5, 0.3, 0.2]]).log()
    return [("random, top_p 0.9", (torch.randn(3, 40, generator=g), 0.9)),
            ("peaked, top_p 0.5", (torch.randn(3, 40, generator=g) * 4, 0.5)),
            ("probabilities 0.5, 0.3, 0.2, top_p 0.75", (exact, 0.75)),
            ("probabilities 0.5, 0.3, 0.2 shuffled, top_p 0.6", (exact[:, [2, 0, 1]], 0.6)),
            ("top_p 0 (keep one token)", (torch.randn(2, 10, generator=g), 0.0)),
            ("top_p 1 (keep everything)", (torch.randn(2, 10, generator=g), 1.0))]


def _top_p_drop_crossing(logits, top_p):
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    remove = probs.cumsum(-1) > top_p  # drops the token whose probability crosses top_p
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def _top_p_no_minimum(logits, top_p):
    sorted_logits, order = logits.sort(-1)
    remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def _top_p_zero_fill(logits, top_p):
    out = _top_p_reference(logits, top_p)
    return out.masked_fill(out == float("-inf"), 0.0)


register(
    "top_p_filter", "08_generation", "(logits, top_p)",
    "set logits outside the nucleus to -inf: keep the smallest set of most likely tokens whose probability reaches top_p (at least one)",
    reference=_top_p_reference,
    cases=_top_p_cases,
    mistakes=[
        (_top_p_drop_crossing,
         "the token whose probability crosses top_p is dropped: with 0.5, 0.3, 0.2 and top_p 0.75, the nucleus is {0.5, 0.3} (0.5 alone does not reach 0.75)",
         "keep a token when the probability of the tokens before it is still below top_p (cumsum - p < top_p), or sort ascending and remove where cumsum <= 1 - top_p"),
        (_top_p_no_minimum, "with a tiny top_p every token is removed", "always keep the most likely token"),
        (_top_p_zero_fill, "removed tokens are set to 0; a logit of 0 is still a likely token", "use float('-inf')"),
    ],
)


def _top_k_reference(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    return TopKLogitsWarper(top_k)(None, logits.clone())


def _top_k_exactly_k(logits, k):
    k = min(k, logits.shape[-1])
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(k).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


register(
    "top_k_filter", "08_generation", "(logits, top_k)",
    "set every logit below the k-th largest (of its row) to -inf; ties with the k-th stay",
    reference=_top_k_reference,
    cases=lambda: [("random, k 5", (torch.randn(3, 20, generator=_gen(12)), 5)),
                   ("ties at the k-th value", (torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]]), 2)),
                   ("k larger than the vocabulary", (torch.randn(2, 4, generator=_gen(13)), 10)),
                   ("k 1", (torch.randn(2, 6, generator=_gen(14)), 1))],
    mistakes=[
        (_top_k_exactly_k, "ties with the k-th logit are removed (topk picks one of them arbitrarily)",
         "compare values: remove logits < the k-th largest value"),
        (lambda x, k: x.masked_fill(x <= x.topk(min(k, x.shape[-1])).values[..., -1:], float("-inf")),
         "the k-th token itself is removed (<= instead of <)", "keep logits >= the k-th largest"),
        (lambda x, k: x.masked_fill(x < x.topk(k).values[..., -1:], float("-inf")),
         "topk fails when k is larger than the vocabulary", "use min(top_k, logits.shape[-1])"),
    ],
)


register(
    "repetition_penalty", "08_generation", "(input_ids, logits, penalty)",
    "for tokens already in input_ids, divide positive logits by penalty and multiply negative ones (once per token)",
    reference=lambda ids, logits, p: RepetitionPenaltyLogitsProcessor(p)(ids, logits.clone()),
    cases=lambda: [("random, penalty 1.3", (torch.tensor([[1, 4, 7]]), torch.randn(1, 10, generator=_gen(15)), 1.3)),
                   ("negative logits", (torch.tensor([[0, 2]]), torch.tensor([[-2.0, 1.0, -1.0, 0.5]]), 2.0)),
                   ("a token repeated 3 times", (torch.tensor([[3, 3, 3, 1]]), torch.tensor([[0.5, 2.0, -1.0, 4.0, -3.0]]), 2.0)),
                   ("batch of 2", (torch.tensor([[0, 1], [2, 2]]), torch.randn(2, 5, generator=_gen(16)), 1.5))],
    mistakes=[
        (lambda ids, x, p: x.scatter(1, ids, x.gather(1, ids) / p),
         "negative logits are divided too, which makes a seen token with a negative logit MORE likely",
         "torch.where(score < 0, score * penalty, score / penalty)"),
        (lambda ids, x, p: _penalise_each_occurrence(ids, x, p),
         "a token seen 3 times is penalised 3 times; the rule penalises each seen token once", "gather, transform once, scatter back"),
    ],
)


def _penalise_each_occurrence(ids, x, p):
    x = x.clone()
    for b in range(ids.shape[0]):
        for t in ids[b].tolist():
            x[b, t] = x[b, t] * p if x[b, t] < 0 else x[b, t] / p
    return x


register(
    "temperature", "08_generation", "(logits, temperature)", "logits scaled for sampling at the given temperature",
    reference=lambda logits, t: TemperatureLogitsWarper(float(t))(None, logits.clone()),
    cases=lambda: [("T = 0.5", (torch.randn(2, 8, generator=_gen(17)), 0.5)), ("T = 2", (torch.randn(2, 8, generator=_gen(18)), 2.0))],
    mistakes=[(lambda x, t: x * t, "multiplied by the temperature; a low temperature must sharpen the distribution", "divide: logits / temperature"),
              (lambda x, t: (x.softmax(-1) / t), "returns scaled probabilities, not logits", "divide the logits, before any softmax")],
)


# =============================================================================================
# === 09_chat ===
# =============================================================================================


@functools.lru_cache(maxsize=1)
def _chat_tokenizer() -> LlamaTokenizer:
    return LlamaTokenizer.from_pretrained(PROJECT_DATA_DIR / "tokenizer.model", legacy=True)


_SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
_TURNS = [{"role": "user", "content": "What is RoPE?"}, {"role": "assistant", "content": "  A rotation of q and k.  "},
          {"role": "user", "content": " And RMSNorm? "}]


def _chat_cases() -> Cases:
    return [("one user message", ([_TURNS[0]],)), ("system + user", ([_SYSTEM, _TURNS[0]],)),
            ("system + three turns", ([_SYSTEM, *_TURNS],)), ("three turns, spaces around the content", (list(_TURNS),))]


def _chat_variant(messages, strip=True, eos=" </s>", bos_each=True, sys_separate=False):
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = "" if bos_each else "<s>"
    for i, m in enumerate(messages):
        c = m["content"].strip() if strip else m["content"]
        if i == 0 and system is not None:
            if sys_separate:
                out += "<<SYS>>\n" + system + "\n<</SYS>>\n\n"
            else:
                c = ("<<SYS>>\n" + system + "\n<</SYS>>\n\n" + m["content"]).strip() if strip else "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + c
        if m["role"] == "user":
            out += ("<s>" if bos_each else "") + "[INST] " + c + " [/INST]"
        else:
            out += " " + c + eos
    return out


register(
    "llama2_chat_prompt", "09_chat", "(messages)", "the Llama 2 chat prompt string for a list of {'role', 'content'} messages",
    reference=lambda messages: _chat_tokenizer().apply_chat_template(messages, tokenize=False),
    cases=_chat_cases,
    mistakes=[
        (lambda ms: _chat_variant(ms, strip=False), "the message contents are not stripped of surrounding spaces", "use content.strip()"),
        (lambda ms: _chat_variant(ms, eos=""), "the assistant's answer is not closed by </s>", "append ' </s>' after each answer"),
        (lambda ms: _chat_variant(ms, bos_each=False), "<s> is written once at the start; every [INST] turn starts with <s>", "prefix each user turn with <s>"),
        (lambda ms: _chat_variant(ms, sys_separate=True), "the system prompt is written before [INST]; it lives inside the first [INST]",
         "prepend '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' to the first user message"),
    ],
)


# =============================================================================================
# === 10_pretraining ===
# =============================================================================================


def _causal_lm_loss_cases() -> Cases:
    g = _gen(10)
    logits = torch.randn(2, 7, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 7), generator=g)
    padded = labels.clone()
    padded[0, 4:] = -100  # right padding in the first row
    padded[1, :3] = -100  # a prompt that is not trained on in the second
    return [
        ("2 x 7 tokens, vocab 11, every label counts", (logits, labels)),
        ("the same with -100 on padding and on a prompt", (logits, padded)),
        ("one sequence of 2 tokens (one prediction)", (logits[:1, :2], labels[:1, :2])),
        ("peaked logits: a confident model", (F.one_hot(labels, 11).float() * 8, padded)),
    ]


def _loss_no_shift(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _loss_shift_backwards(logits, labels):
    return F.cross_entropy(logits[:, 1:].reshape(-1, logits.shape[-1]), labels[:, :-1].reshape(-1), ignore_index=-100)


def _loss_minus_100_as_token_0(logits, labels):
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).mean()


def _loss_minus_100_in_the_count(logits, labels):
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                                reduction="none")
    return per_token.sum() / per_token.numel()


def _loss_sum(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


register(
    "causal_lm_loss", "10_pretraining", "(logits, labels)",
    "the mean next-token cross-entropy: logits (batch, seq, vocab) at t predict labels[:, t + 1]; labels of -100 do not count",
    reference=causal_lm_loss,
    cases=_causal_lm_loss_cases,
    mistakes=[
        (_loss_no_shift, "the labels are not shifted: position t is scored on its own token, not the next one",
         "compare logits[:, :-1] with labels[:, 1:]"),
        (_loss_shift_backwards, "the shift goes the wrong way: each position is scored on the token before it",
         "drop the LAST logit and the FIRST label: logits[:, :-1] with labels[:, 1:]"),
        (_loss_minus_100_as_token_0, "labels of -100 are read as token 0 instead of being ignored",
         "leave them out: F.cross_entropy(..., ignore_index=-100), or mask them before gathering"),
        (_loss_minus_100_in_the_count, "ignored positions (-100) are counted in the number of tokens the mean divides by",
         "divide by the number of labels that are not -100"),
        (_loss_sum, "the loss is the sum over tokens, not the mean", "average over the tokens that count (reduction='mean')"),
    ],
)


# =============================================================================================
# === 11_classification ===
# =============================================================================================


def _spam_f1_cases() -> Cases:
    g = _gen(11)
    truth = (torch.rand(60, generator=g) < 0.2).long().tolist()
    noisy = [y if r > 0.25 else 1 - y for y, r in zip(truth, torch.rand(60, generator=g).tolist())]
    few = [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    return [
        ("60 messages, 20 % spam, a quarter of the answers wrong", (truth, noisy)),
        ("10 messages: 2 of 3 spam caught, 1 false alarm", (few, [1, 0, 0, 1, 0, 0, 0, 0, 0, 1])),
        ("every answer right", (few, list(few))),
        ("the majority baseline: always ham", (few, [0] * 10)),
    ]


def _counts(y_true, y_pred, c=1):
    tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
    fp = sum(1 for t, p in zip(y_true, y_pred) if t != c and p == c)
    fn = sum(1 for t, p in zip(y_true, y_pred) if t == c and p != c)
    return tp, fp, fn


def _f1_of(c):
    def f1(y_true, y_pred):
        tp, fp, fn = _counts(y_true, y_pred, c)
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return f1


def _f1_no_zero_guard(y_true, y_pred):
    tp, fp, fn = _counts(y_true, y_pred)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def _f1_arithmetic_mean(y_true, y_pred):
    tp, fp, fn = _counts(y_true, y_pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return (precision + recall) / 2


register(
    "spam_f1", "11_classification", "(y_true, y_pred)",
    "F1 of the spam class (label 1) from two lists of 0/1 labels, as a float; 0.0 when no spam is predicted",
    reference=lambda y_true, y_pred: classification_metrics(y_true, y_pred)["f1"],
    cases=_spam_f1_cases,
    mistakes=[
        (lambda t, p: sum(a == b for a, b in zip(t, p)) / len(t), "this is the accuracy, not the F1 of spam",
         "count true positives, false positives and false negatives of label 1: F1 = 2 TP / (2 TP + FP + FN)"),
        (_f1_of(0), "this is the F1 of ham (label 0); the rare class, spam (label 1), is the one to score",
         "count a true positive when both labels are 1"),
        (_f1_arithmetic_mean, "precision and recall are averaged; F1 is their harmonic mean",
         "2 * precision * recall / (precision + recall)"),
        (_f1_no_zero_guard, "a classifier that never says spam makes precision 0/0",
         "return 0.0 when there are no true positives (scikit-learn's zero_division=0)"),
    ],
)


# =============================================================================================
# === 12_lora ===


def _lora_cases() -> Cases:
    g = _gen(120)
    return [
        # in != out: a missing transpose raises; alpha / r = 2
        ("x (2, 3, 16), W (24, 16), r = 4, alpha = 8",
         (torch.randn(2, 3, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g), 8, 4)),
        # square W, so a missing transpose gives numbers (the wrong ones); alpha / r = 0.25
        ("x (5, 16), square W (16, 16), r = 4, alpha = 1",
         (torch.randn(5, 16, generator=g), torch.randn(16, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g), 1, 4)),
        ("x (4, 12), W (12, 12), r = 2, alpha = 16",
         (torch.randn(4, 12, generator=g), torch.randn(12, 12, generator=g), torch.randn(2, 12, generator=g), torch.randn(12, 2, generator=g), 16, 2)),
    ]


register(
    "lora_forward", "12_lora", "(x, weight, lora_A, lora_B, alpha, r)",
    "a LoRA-adapted linear layer for row vectors: x W^T + (alpha / r) x A^T B^T (Hu et al. 2021, eq. 3)",
    reference=lora_forward,
    cases=_lora_cases,
    mistakes=[
        (lambda x, w, a, b, alpha, r: x @ w.t() + x @ a.t() @ b.t(),
         "the low-rank update is not scaled by alpha / r", "multiply the update x A^T B^T by alpha / r"),
        (lambda x, w, a, b, alpha, r: x @ w.t() + alpha * (x @ a.t() @ b.t()),
         "the update is scaled by alpha, not alpha / r", "divide by the rank: alpha / r"),
        (lambda x, w, a, b, alpha, r: x @ w.t() + (r / alpha) * (x @ a.t() @ b.t()),
         "the scale is upside down: r / alpha instead of alpha / r", "use alpha / r"),
        (lambda x, w, a, b, alpha, r: x @ w + (alpha / r) * (x @ a.t() @ b.t()),
         "the frozen weight is not transposed: W is (out, in), so a row vector x needs x W^T", "use x @ weight.T"),
        (lambda x, w, a, b, alpha, r: x @ w.t() + (alpha / r) * (x @ (b @ a)),
         "the update multiplies x by B A instead of (B A)^T", "for row vectors the update is x A^T B^T = x (B A)^T"),
        (lambda x, w, a, b, alpha, r: x @ w.t() + (alpha / r) * (x @ b.t() @ a.t()),
         "B and A are applied in the wrong order: x goes through A (r, in) first, then B (out, r)", "compute (x @ A.T) @ B.T"),
        (lambda x, w, a, b, alpha, r: (alpha / r) * (x @ a.t() @ b.t()),
         "the frozen base output x W^T is missing: LoRA adds to the pretrained layer, it does not replace it", "return x @ W.T + the update"),
    ],
)


# =============================================================================================
# === 13_instruction_tuning_and_dpo ===


def _labels_cases() -> Cases:
    g = _gen(130)
    ids = torch.randint(3, 2048, (25,), generator=g)
    return [
        ("one answer: tokens 17-24", (ids.clone(), [(17, 25)])),
        ("two answers in a multi-turn chat", (torch.randint(3, 2048, (30,), generator=g), [(8, 13), (24, 30)])),
        ("an answer in the middle", (torch.randint(3, 2048, (12,), generator=g), [(4, 9)])),
    ]


def _labels_variant(ids, spans, fill=-100, inclusive=False, skip_first=False, invert=False, shift=False):
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    for s, e in spans:
        keep[s + int(skip_first): e + int(inclusive)] = True
    if invert:
        keep = ~keep
    out = torch.where(keep, ids, torch.full_like(ids, fill))
    if shift:
        out = torch.cat([out[1:], out.new_full((1,), fill)])
    return out


register(
    "assistant_labels", "13_instruction_tuning_and_dpo", "(input_ids, assistant_spans)",
    "SFT labels: input_ids inside the [start, end) assistant spans, -100 everywhere else (not shifted)",
    reference=assistant_labels,
    cases=_labels_cases,
    mistakes=[
        (lambda ids, spans: ids.clone(), "nothing is masked: the loss would also train the model to write the user's prompt",
         "set the labels outside the assistant spans to -100"),
        (lambda ids, spans: _labels_variant(ids, spans, fill=0), "the masked positions hold 0, a real token id (<unk>), not -100",
         "cross_entropy skips only ignore_index = -100; fill with -100"),
        (lambda ids, spans: _labels_variant(ids, spans, invert=True), "the mask is inverted: the prompt is kept and the answer masked",
         "keep the labels inside the spans and mask the rest"),
        (lambda ids, spans: _labels_variant(ids, spans, inclusive=True), "the spans' end is included: [start, end) is half-open",
         "keep positions start <= t < end, i.e. labels[start:end]"),
        (lambda ids, spans: _labels_variant(ids, spans, skip_first=True), "the first assistant token is masked",
         "the span starts at the answer's first token: keep labels[start:end]"),
        (lambda ids, spans: _labels_variant(ids, spans, shift=True), "the labels are shifted by one; the model shifts them itself inside its loss",
         "put each label under its own token: labels[t] = input_ids[t]"),
    ],
)


def _dpo_cases() -> Cases:
    g = _gen(131)
    def logps(n):
        return -torch.rand(n, generator=g) * 30 - 1  # sequence log-probs are negative
    return [
        ("8 pairs, beta = 0.1", (logps(8), logps(8), logps(8), logps(8), 0.1)),
        ("5 pairs, beta = 0.5", (logps(5), logps(5), logps(5), logps(5), 0.5)),
        ("one pair the policy gets badly wrong, beta = 1 (z = -200)",
         (torch.tensor([-250.0]), torch.tensor([-50.0]), torch.tensor([-50.0]), torch.tensor([-50.0]), 1.0)),
    ]


def _dpo_logits(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


register(
    "dpo_loss", "13_instruction_tuning_and_dpo",
    "(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)",
    "the DPO loss (Rafailov et al. 2023, eq. 7): mean of -log sigmoid(beta((pi_c - ref_c) - (pi_r - ref_r)))",
    reference=dpo_loss,
    cases=_dpo_cases,
    mistakes=[
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(-beta * _dpo_logits(pc, pr, rc, rr)).mean(),
         "the sign is flipped: this loss rewards the rejected answers", "the argument of log sigmoid is +beta * (chosen log-ratio - rejected log-ratio)"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * (pc - pr)).mean(),
         "the reference model is missing: without it the loss only widens the policy's own gap, with nothing holding it near the reference",
         "use the log-ratios pi - ref for both answers"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(_dpo_logits(pc, pr, rc, rr)).mean(),
         "beta is missing", "multiply the difference of log-ratios by beta before the log sigmoid"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * ((pc - rc) + (pr - rr))).mean(),
         "the two log-ratios are added; DPO takes chosen minus rejected", "(pi_c - ref_c) - (pi_r - ref_r)"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _dpo_logits(pc, pr, rc, rr)).sum(),
         "the losses are summed, not averaged", "take the mean over the pairs"),
        (lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _dpo_logits(pc, pr, rc, rr)),
         "returns one loss per pair instead of their mean", "end with .mean()"),
        (lambda pc, pr, rc, rr, beta: -torch.log(torch.sigmoid(beta * _dpo_logits(pc, pr, rc, rr))).mean(),
         "log(sigmoid(z)) overflows: sigmoid(-200) is 0 in float32 and log(0) = -inf",
         "use F.logsigmoid(z) (or -F.softplus(-z)), which never forms the tiny probability"),
    ],
)


# =============================================================================================
# === 14_quantization ===


def _absmax_cases() -> Cases:
    g = _gen(14)
    w = torch.randn(6, 32, generator=g) * 0.05
    outlier = w.clone()
    outlier[2, 7] = 1.5  # one large weight: a per-tensor scale would crush every other row
    zero_row = torch.randn(3, 8, generator=g)
    zero_row[1] = 0.0
    return [("random 6x32", (w,)), ("an outlier in row 2", (outlier,)), ("a row of zeros (scale 1)", (zero_row,)),
            ("wide matrix 2x64", (torch.randn(2, 64, generator=g) * 3,))]


def _absmax_variant(w, scale_of=lambda w: w.abs().amax(dim=1), levels=127, rounding=torch.round):
    absmax = scale_of(w.float())
    scale = torch.where(absmax > 0, absmax / levels, torch.ones_like(absmax))
    scale = scale.expand(w.shape[0]).clone() if scale.dim() == 0 else scale
    return rounding(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _absmax_per_column(w):
    absmax = w.float().abs().amax(dim=0)  # (cols,)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    return torch.round(w / scale[None, :]).clamp(-127, 127).to(torch.int8), scale


register(
    "absmax_quantize", "14_quantization", "(w)",
    "int8 absmax quantization of a (rows, cols) weight, one scale per row: scale = max|row| / 127 (1 for an all-zero row), "
    "q = round(w / scale) as int8; return (q, scale) with scale of shape (rows,)",
    reference=absmax_quantize,
    cases=_absmax_cases,
    mistakes=[
        (lambda w: _absmax_variant(w, scale_of=lambda w: w.abs().max()), "one scale for the whole tensor instead of one per row",
         "take the absmax of each row: w.abs().amax(dim=1)"),
        (_absmax_per_column,
         "one scale per column (input channel) instead of one per row (output channel)", "reduce over the last dimension: amax(dim=1)"),
        (lambda w: _absmax_variant(w, rounding=torch.trunc), "the division is truncated toward zero (.to(torch.int8) alone), not rounded",
         "round first: torch.round(w / scale[:, None]).to(torch.int8)"),
        (lambda w: _absmax_variant(w, rounding=torch.floor), "the division is floored (rounded down), not rounded to the nearest integer",
         "use torch.round"),
        (lambda w: _absmax_variant(w, levels=128), "the scale divides by 128: the grid is -127..127, so the largest weight must map to 127",
         "scale = absmax / 127"),
    ],
)


def _dequant_cases() -> Cases:
    out = []
    for label, (w,) in _absmax_cases():
        out.append((label, absmax_quantize(w)))
    return out


register(
    "absmax_dequantize", "14_quantization", "(q, scale)",
    "float32 weights (rows, cols) back from int8 codes q (rows, cols) and per-row scales (rows,): q * scale of its row",
    reference=absmax_dequantize,
    cases=_dequant_cases,
    mistakes=[
        (lambda q, scale: q.float() * scale, "the scales are broadcast along the columns (q * scale); they belong to the rows",
         "give the scale a column axis: q.float() * scale[:, None]"),
        (lambda q, scale: q.float() / scale[:, None], "the codes are divided by the scale; dequantizing multiplies",
         "w_hat = q * scale[:, None]"),
        (lambda q, scale: q.float() * scale[:, None] / 127, "the scale is divided by 127 again; it already is absmax / 127",
         "multiply by the scale as it is"),
    ],
)


def _nf4_lookup_cases() -> Cases:
    g = _gen(41)
    out = []
    for label, n in (("one block of 64", 64), ("five blocks", 320), ("a big block scale", 128)):
        w = torch.randn(n, generator=g) * (0.03 if n != 128 else 2.0)
        codes, absmax = blockwise_quantize(w, NF4_CODE, 64)
        out.append((label, (pack_codes(codes, 4), absmax, NF4_CODE.clone())))
    return out


def _nf4_lookup_reference(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return blockwise_dequantize(unpack_codes(packed, 4, 2 * packed.numel()), absmax, code, 64)


def _nf4_low_first(packed, absmax, code):
    idx = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)
    return (code[idx.long()].reshape(-1, 64) * absmax[:, None]).reshape(-1)


def _nf4_tiled_scales(packed, absmax, code):
    idx = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return code[idx.long()] * absmax.repeat(64)


register(
    "nf4_lookup", "14_quantization", "(packed, absmax, code)",
    "NF4 weights from packed bytes (two 4-bit indices per byte, the first in the high nibble), the absmax of each "
    "block of 64 values (n / 64,) and the 16-value codebook: code[index] * absmax of its block, shape (n,)",
    reference=_nf4_lookup_reference,
    cases=_nf4_lookup_cases,
    mistakes=[
        (_nf4_low_first, "the low nibble is taken as the first value; the first value is in the high nibble (bitsandbytes' order)",
         "first = packed >> 4, second = packed & 0xF, interleaved with torch.stack(..., dim=1).reshape(-1)"),
        (_nf4_tiled_scales, "the block scales are tiled (absmax.repeat) instead of repeated per block: values 0..63 belong to block 0",
         "use absmax.repeat_interleave(64), or reshape the values to (-1, 64) and multiply by absmax[:, None]"),
        (lambda packed, absmax, code: code[torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()],
         "the codebook values are not multiplied by their block's absmax", "multiply each block of 64 by its absmax"),
        (lambda packed, absmax, code: ((torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).float() - 7.5) / 7.5).reshape(-1, 64).mul(absmax[:, None]).reshape(-1),
         "the 4-bit index is used as a uniform number; NF4 looks it up in the codebook", "index the codebook: code[index.long()]"),
    ],
)


# =============================================================================================
# === 16_beyond_one_machine ===


def _local_rows_reference(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return local_rows(batch, Parallel("ddp", rank, world, torch.device("cpu"), None, world, rank, 1))


def _local_rows_cases() -> Cases:
    batch = torch.arange(24).view(8, 3)
    return [(f"rank {r} of {w}, 8 rows", (batch, r, w)) for w in (1, 2, 4) for r in range(w)]


register(
    "local_rows", "16_beyond_one_machine", "(batch, rank, world)",
    "the rows of the global batch (B, T) that data-parallel rank `rank` of `world` trains on: the rank-th of world equal consecutive blocks",
    reference=_local_rows_reference,
    cases=_local_rows_cases,
    mistakes=[
        (lambda batch, rank, world: batch[rank::world], "the rows are strided (rank r takes every world-th row), not a consecutive block",
         "take rows rank * B/world up to (rank + 1) * B/world"),
        (lambda batch, rank, world: batch[rank * world : (rank + 1) * world], "the block has `world` rows instead of B / world",
         "each rank takes batch.shape[0] // world rows"),
    ],
)


def _row_parallel_reference(x: torch.Tensor, weight: torch.Tensor, world: int) -> torch.Tensor:
    # pretraining_tp's emulation on one device: the input columns split `world` ways, partial products summed
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight
    return SlicedLinear(layer, world, split_input=True)(x)


def _row_parallel_cases() -> Cases:
    g = _gen(16)
    return [(f"{w} ranks", (torch.randn(2, 5, 8, generator=g), torch.randn(6, 8, generator=g), w)) for w in (1, 2, 4)]


register(
    "row_parallel_linear", "16_beyond_one_machine", "(x, weight, world)",
    "F.linear(x, weight) computed as `world` ranks would: weight's columns and x's last dimension split in world blocks, the partial products summed",
    reference=_row_parallel_reference,
    cases=_row_parallel_cases,
    mistakes=[
        (lambda x, weight, world: sum(F.linear(xi, wi) for xi, wi in zip(x.chunk(world, -1), weight.chunk(world, -1))) / world,
         "the partial products are averaged, not summed", "an all-reduce SUMS the ranks' partial results: drop the division"),
        (lambda x, weight, world: F.linear(x.chunk(world, -1)[0], weight.chunk(world, 1)[0]),
         "this is one rank's partial product only: the all-reduce that adds the other ranks' is missing",
         "compute the product for every block pair and add them all"),
    ],
)
