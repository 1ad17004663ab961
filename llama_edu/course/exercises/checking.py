"""The exercise machinery: the registry, and ``check``, which runs an answer against the package's
own function and says why it differs (see the package docstring for how to add an exercise).

How ``check`` runs an answer
----------------------------
* The reference runs first, on pristine copies of every case's inputs; the originals are never
  handed to anyone, so they stay a record of what the inputs were.
* Each call of the learner's function gets its own deep copies (tensors, lists, configs, layers,
  models). After the call the copies are compared with the originals: an answer that writes into
  its inputs (``x *= 2``, ``layer.weight.data = ...``, ``config.x = ...``) is told so, because the
  caller's tensors must stay as they were.
* Each call runs under a time limit (``check(..., timeout=30)``; default :data:`DEFAULT_TIMEOUT`,
  or the environment variable ``LLAMA_EDU_CHECK_TIMEOUT``). The call runs in a worker thread and
  the notebook's thread waits at most that long. Why a thread and not a subprocess: a thread
  costs nothing, works everywhere a notebook runs (Colab, Windows and macOS, where ``fork`` is
  unsafe or unavailable) and keeps the learner's objects, prints and closures as they are; a
  subprocess would have to pickle models and lambdas and re-import torch. A thread cannot be
  killed, so on a timeout the checker raises an exception *inside* it
  (``PyThreadState_SetAsyncExc``), which stops any Python loop at its next bytecode; only a single
  C call that runs for ever (rare in an exercise) keeps a thread busy until the kernel restarts,
  and the checker says so. The grader (``llama_edu grade``) adds a hard limit around the whole
  notebook in its own kernel process.
* Anything the answer raises (``SystemExit`` and other ``BaseException`` included) is a failed
  attempt that says what happened, with the line of the learner's code that raised it; only
  ``KeyboardInterrupt`` (the notebook's stop button) goes through.
* Results are compared by type as well as value: an integer answer must be an ``int`` (not a float
  or a tensor), a tensor must have the expected shape and dtype, floats agree within a tolerance
  that follows the dtype and the magnitude of the values (a few units in the last place of the
  largest value), so every correct float32 formulation passes.
"""

from __future__ import annotations

import copy
import ctypes
import itertools
import math
import numbers
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Cases = list[tuple[str, tuple]]

#: Seconds one call of a learner's function may take before ``check`` gives up on it.
DEFAULT_TIMEOUT = 30.0


@dataclass
class Exercise:
    """One exercise: where it is taught, what to write, the package function it must match, the
    inputs it is checked on, and the typical mistakes (wrong function, what it does, hint).

    ``tolerance(args) -> (atol, rtol)`` widens the float tolerance for one case where a correct
    formula's rounding grows with the input (cos of a large angle); ``also(fn)`` checks what the
    values cannot show (the KV cache is used)."""

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
    tolerance: Callable[[tuple], tuple[float, float]] | None = None

    def tolerances(self, args: tuple) -> tuple[float, float]:
        return self.tolerance(args) if self.tolerance is not None else (self.atol, self.rtol)


EXERCISES: dict[str, Exercise] = {}


def register(name: str, notebook: str, signature: str, task: str, **kwargs: Any) -> Exercise:
    """Add an exercise to :data:`EXERCISES` (see the module docstring)."""
    if name in EXERCISES:
        raise ValueError(f"an exercise named {name!r} is already registered (notebook {EXERCISES[name].notebook})")
    EXERCISES[name] = Exercise(name, notebook, signature, task, **kwargs)
    return EXERCISES[name]


# ---------------------------------------------------------------------------------------------
# Held-out inputs: the same cases drawn from other seeds (for grading)
# ---------------------------------------------------------------------------------------------

_SEED_OFFSET = 0


def _gen(seed: int) -> torch.Generator:
    """The random generator an exercise's cases draw from; :func:`held_out` shifts its seeds."""
    return torch.Generator().manual_seed(seed + _SEED_OFFSET)


class held_out:
    """``with held_out(k): ex.cases()`` draws every random input from other seeds (k != 0), so a
    grader checks answers on values the notebook never showed; shapes and the adversarial cases
    (overflow, ties, offsets) stay."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __enter__(self) -> "held_out":
        global _SEED_OFFSET
        self._saved, _SEED_OFFSET = _SEED_OFFSET, 1_000_003 * self.k
        return self

    def __exit__(self, *exc: Any) -> None:
        global _SEED_OFFSET
        _SEED_OFFSET = self._saved


# ---------------------------------------------------------------------------------------------
# Running a call: own copies, a time limit, every exception caught
# ---------------------------------------------------------------------------------------------


@dataclass
class Raised:
    """What a call raised, so two failing calls can be compared like two results. ``where`` is the
    line of the learner's code that raised, when it can be found."""

    error: BaseException
    where: str = ""

    def __str__(self) -> str:
        text = str(self.error)
        return f"{type(self.error).__name__}: {text}" if text else type(self.error).__name__


@dataclass
class TimedOut:
    """A call that did not return within the time limit; ``stopped`` says whether it was stopped."""

    seconds: float
    stopped: bool


class _TimeLimit(BaseException):
    """Raised inside a worker thread that ran out of time. A BaseException, so an answer's own
    ``except Exception`` cannot swallow it."""


def _copy(x: Any) -> Any:
    """A deep copy (tensors, lists, dicts, configs, layers, models), so no call sees another's."""
    try:
        return copy.deepcopy(x)
    except Exception:  # an object that cannot be copied is passed as it is
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, (tuple, list)):
            return type(x)(_copy(v) for v in x)
        return x


_clone = _copy  # the name the exercise modules use


_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_STDLIB = os.path.dirname(os.path.abspath(os.__file__))


def _learner_line(error: BaseException) -> str:
    """'line N: code' of the innermost frame that is the learner's (not torch, not the checker,
    not the standard library)."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        f = os.path.abspath(frame.filename)
        if f.startswith((_HERE, _TORCH, _STDLIB)) or "site-packages" in f:
            continue
        return f"line {frame.lineno}: {frame.line.strip()}" if frame.line else f"line {frame.lineno}"
    return ""


def _run(fn: Callable, args: tuple) -> Any:
    """``fn(*args)`` with gradients off; any exception but KeyboardInterrupt becomes a Raised."""
    try:
        with torch.no_grad():
            return fn(*args)
    except (KeyboardInterrupt, _TimeLimit):
        raise
    except BaseException as e:  # SystemExit, RecursionError, ...: a result to diagnose, not a crash
        return Raised(e, _learner_line(e))


def _call(fn: Callable, args: tuple) -> Any:
    """Run one of the checker's own functions (a reference or a known mistake) on copies."""
    return _run(fn, _copy(args))


def _async_raise(thread: threading.Thread) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_TimeLimit))


def _limited(fn: Callable, args: tuple, timeout: float) -> Any:
    """``_run(fn, args)`` in a worker thread, waiting at most ``timeout`` seconds; a call that takes
    longer is interrupted (see the module docstring) and reported as :class:`TimedOut`."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = _run(fn, args)
        except _TimeLimit:
            box["stopped"] = True
        except KeyboardInterrupt as e:
            box["interrupt"] = e

    worker = threading.Thread(target=work, name="llama_edu check", daemon=True)
    worker.start()
    try:
        worker.join(timeout)
    except KeyboardInterrupt:  # the stop button: stop the answer too, then let the notebook stop
        _async_raise(worker)
        raise
    if worker.is_alive():
        deadline = time.monotonic() + 2.0
        while worker.is_alive() and time.monotonic() < deadline:
            _async_raise(worker)  # again, in case a bare `except:` in the answer caught it
            worker.join(0.05)
        return TimedOut(timeout, stopped=not worker.is_alive())
    if "interrupt" in box:
        raise box["interrupt"]
    return box.get("result")


def _timeout(timeout: float | None) -> float:
    if timeout is not None:
        return float(timeout)
    try:
        return float(os.environ.get("LLAMA_EDU_CHECK_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


# ---------------------------------------------------------------------------------------------
# Inputs changed in place
# ---------------------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and bool(torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                               and torch.equal(a.nan_to_num(), b.nan_to_num()))))
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _changed(original: Any, after: Any, what: str) -> str | None:
    """How ``after`` (the learner's copy of an input) differs from ``original``, or None."""
    if isinstance(original, torch.Tensor):
        if not isinstance(after, torch.Tensor) or after.shape != original.shape or after.dtype != original.dtype:
            return f"{what} was replaced or reshaped in place"
        if _same(original, after):
            return None
        n = int((original != after).sum()) if original.numel() else 0
        return f"{what} was written to in place ({n} of {original.numel()} values changed)"
    if isinstance(original, torch.nn.Module):
        before, now = original.state_dict(), after.state_dict()
        for key, value in before.items():
            if key not in now or not _same(value, now[key]):
                return f"{what}'s weight `{key}` was changed"
        if set(now) - set(before):
            return f"{what} got new weights: {', '.join(sorted(set(now) - set(before)))[:200]}"
        return None
    if hasattr(original, "to_dict") and callable(original.to_dict):  # a config
        before, now = original.to_dict(), after.to_dict()
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                return f"{what}'s field `{key}` was changed from {before.get(key)!r} to {now.get(key)!r}"
        return None
    if isinstance(original, (list, tuple)):
        if type(after) is not type(original) or len(after) != len(original):
            return f"{what} was changed in place (now {str(after)[:80]})"
        for i, (o, a) in enumerate(zip(original, after)):
            problem = _changed(o, a, f"{what}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(original, dict):
        if set(original) != set(after):
            return f"{what} was changed in place (its keys are now {sorted(after)[:10]})"
        for k in original:
            problem = _changed(original[k], after[k], f"{what}[{k!r}]")
            if problem:
                return problem
        return None
    return None if _same(original, after) else f"{what} was changed in place"


def _argument_names(signature: str) -> list[str]:
    inner = signature.strip()[1:-1]
    return [part.split("=")[0].strip() for part in inner.split(",") if part.strip()]


def _mutation(ex: Exercise, original: tuple, after: tuple) -> str | None:
    names = _argument_names(ex.signature)
    for i, (o, a) in enumerate(zip(original, after)):
        problem = _changed(o, a, f"`{names[i]}`" if i < len(names) else f"argument {i + 1}")
        if problem:
            return problem
    return None


# ---------------------------------------------------------------------------------------------
# Comparing a result with the expected one, and saying how it differs
# ---------------------------------------------------------------------------------------------


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in x):
        items = ", ".join(f"tensor {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__ for v in x[:6])
        return f"a {type(x).__name__} of {len(x)} items ({items})"
    if isinstance(x, Raised):
        return f"an error ({x})"
    return f"{type(x).__name__} {x!r}"[:300]


def _tolerance(expected: torch.Tensor, atol: float, rtol: float) -> tuple[float, float]:
    """Tolerances that follow dtype and magnitude: a correct formula evaluated in another order
    differs by a few units in the last place of the largest value it handles."""
    eps = torch.finfo(expected.dtype).eps
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    ulps = 4 if expected.dtype in (torch.float16, torch.bfloat16) else 8
    return max(atol, ulps * eps * scale), max(rtol, 2 * eps)


_FACTORS = [(2.0, "2"), (0.5, "1/2"), (4.0, "4"), (0.25, "1/4"), (8.0, "8"), (0.125, "1/8")]


def _reduction(r: float) -> str:
    """': a sum where a mean belongs?' when a scalar is a whole number of times too large or small."""
    n = (r if r > 1 else 1 / r) if math.isfinite(r) and r > 0 else 0.0
    if n > 2.5 and math.isclose(n, round(n), rel_tol=1e-4):
        return "; a sum where a mean belongs (reduction)?" if r > 1 else "; a mean where a sum belongs, or a count that includes ignored items (reduction)?"
    return ""


def _name_factor(r: float) -> str:
    """' (= 1/sqrt(64))' for a ratio that is a factor a learner could have used, else ''."""
    if not math.isfinite(r) or r <= 0:
        return ""
    for value, text in _FACTORS:
        if math.isclose(r, value, rel_tol=1e-3):
            return f" (= {text})"
    for n in range(2, 257):
        if math.isclose(r, math.sqrt(n), rel_tol=1e-4) and int(math.isqrt(n)) ** 2 != n:
            return f" (= sqrt({n}))"
        if math.isclose(r, 1 / math.sqrt(n), rel_tol=1e-4) and int(math.isqrt(n)) ** 2 != n:
            return f" (= 1/sqrt({n}))"
    for n in range(2, 257):
        if math.isclose(r, math.sqrt((n - 1) / n), rel_tol=1e-5) or math.isclose(r, math.sqrt(n / (n - 1)), rel_tol=1e-5):
            return f" (= sqrt({n - 1}/{n}) or its inverse: a division by n - 1 where n belongs (unbiased variance), or the reverse?)"
    if r > 1 and math.isclose(r, round(r), rel_tol=1e-4):
        return f" (= {round(r)})"
    if r < 1 and math.isclose(1 / r, round(1 / r), rel_tol=1e-4):
        return f" (= 1/{round(1 / r)})"
    return ""


def _close(g: torch.Tensor, e: torch.Tensor, atol: float, rtol: float) -> bool:
    return g.shape == e.shape and bool(torch.isclose(g.double(), e.double(), atol=atol, rtol=rtol, equal_nan=True).all())


def _shape_difference(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> str:
    msg = f"the {what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    if got.numel() == expected.numel() and got.dim() == expected.dim() and 1 < got.dim() <= 5 and got.dtype == expected.dtype:
        for perm in itertools.permutations(range(got.dim())):
            if tuple(got.shape[p] for p in perm) == tuple(expected.shape) and _close(got.permute(perm), expected, atol, rtol):
                return msg + f": the values are right but the dimensions are in another order, transposed or permuted (your result.permute{perm} would be right)"
    if got.numel() == expected.numel():
        squeezed_g = [s for s in got.shape if s != 1]
        squeezed_e = [s for s in expected.shape if s != 1]
        if squeezed_g == squeezed_e:
            return msg + ": a dimension of size 1 is missing or extra (keepdim=True? unsqueeze? squeeze?)"
        return msg + ": the same number of values in another shape (a view/reshape is off)"
    if got.dim() == expected.dim():
        diff = [i for i, (a, b) in enumerate(zip(got.shape, expected.shape)) if a != b]
        if len(diff) == 1:
            i = diff[0]
            a, b = got.shape[i], expected.shape[i]
            ratio = f" ({a / b:g} times the expected size)" if b and a and (a % b == 0 or b % a == 0) else ""
            off = f" (one {'too many' if a > b else 'too few'}: off by one in a slice end or a loop bound?)" if abs(a - b) == 1 else ""
            return msg + f": dimension {i} has size {a} instead of {b}{ratio}{off}"
    return msg + f" ({got.dim()} dimensions instead of {expected.dim()})"


def _tensor_difference(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> str | None:
    if got.shape != expected.shape:
        if expected.is_floating_point() and got.is_floating_point():
            atol, rtol = _tolerance(expected, atol, rtol)
        return _shape_difference(got, expected, atol, rtol, what)
    if got.dtype != expected.dtype:
        msg = f"the {what} has dtype {got.dtype}, expected {expected.dtype}"
        if got.is_floating_point() and expected.is_floating_point() and _close(got.to(expected.dtype), expected, *_tolerance(expected, atol, rtol)):
            return msg + f": the values are right; return it in {expected.dtype} (e.g. .to(<input>.dtype) at the end)"
        return msg
    if expected.numel() == 0:
        return None
    if not expected.is_floating_point():
        bad = got != expected
        if not bad.any():
            return None
        idx = tuple(int(i) for i in bad.nonzero()[0])
        msg = (f"the {what} differs at index {idx}: got {got[idx].item()}, expected {expected[idx].item()} "
               f"({int(bad.sum())} of {bad.numel()} differ)")
        for dim in range(got.dim()):
            for shift in (1, -1):
                n = got.shape[dim]
                if n > 2 and torch.equal(got.roll(shift, dim).narrow(dim, 1, n - 2), expected.narrow(dim, 1, n - 2)):
                    return msg + f": the values are shifted by one position along dimension {dim} (an index is off by one)"
        return msg
    atol, rtol = _tolerance(expected, atol, rtol)
    g, e = got.double(), expected.double()
    bad = ~torch.isclose(g, e, atol=atol, rtol=rtol, equal_nan=True)
    if not bad.any():
        return None
    if got.numel() == 1:
        gv, ev = g.item(), e.item()
        msg = f"the {what} is {gv:.6g}, expected {ev:.6g}"
        if math.isfinite(gv) and math.isfinite(ev) and ev != 0 and gv != 0:
            r = gv / ev
            msg += f" ({r:.4g} times the expected value{_name_factor(r)}{_reduction(r)})" if abs(r - 1) > 1e-3 else f" (off by {gv - ev:.3g})"
            if math.isclose(r, -1, rel_tol=1e-4):
                msg += ": the sign is flipped"
        return msg
    idx = tuple(int(i) for i in bad.nonzero()[0])
    where = f"({int(bad.sum())} of {bad.numel()} values differ; the first at index {idx}: got {g[idx].item():.6g}, expected {e[idx].item():.6g})"
    if torch.isnan(g).any() and not torch.isnan(e).any():
        return f"the {what} contains NaN where the expected values are numbers {where}. NaN comes from an overflow (exp of a large number, or x**2 in float16 -> inf, then inf/inf) or from 0/0 or 0 * inf (a zero norm with no eps, a mask multiplied by -inf)"
    if torch.isinf(g).any() and not torch.isinf(e).any():
        return f"the {what} contains inf where the expected values are finite {where}: something overflowed"
    if torch.isinf(e).any() and not torch.equal(torch.isinf(g) & (g < 0), torch.isinf(e) & (e < 0)):
        return f"the {what} has -inf in other places than expected {where}: a different set of entries is masked"
    finite = torch.isfinite(e) & torch.isfinite(g)
    if finite.all() and torch.allclose(g, -e, atol=atol, rtol=rtol):
        return f"every value of the {what} has the wrong sign {where}"
    distinct = e[finite].abs().unique().numel() > 1
    if finite.all() and e.abs().max() > 0 and distinct:
        ratio = ((g * e).sum() / (e * e).sum()).item()
        if abs(ratio - 1) > 1e-3 and abs(ratio) > 1e-3 and torch.allclose(g, ratio * e, atol=atol, rtol=1e-3):
            return f"the {what} is the expected one times {ratio:.4g}{_name_factor(ratio)} {where}: a scale factor is off"
    if finite.all() and g.shape[-1] > 1:
        shift = (g - e).mean(-1, keepdim=True)
        if shift.abs().max() > atol and _close(g - shift, e, atol, rtol):
            return (f"the {what} is the expected one plus a constant along the last dimension {where}: the softmax of both "
                    "is the same, but the values are not (log-probabilities instead of logits? a missing or extra logsumexp?)")
    if g.dim() >= 2 and g.shape[-1] == g.shape[-2] and _close(g.transpose(-1, -2), e, atol, rtol):
        return f"the {what} is the expected one transposed (its last two dimensions swapped) {where}"
    for i, j in itertools.combinations(range(g.dim()), 2):
        if g.shape[i] == g.shape[j] > 1 and _close(g.transpose(i, j), e, atol, rtol):
            return f"the {what} is the expected one with dimensions {i} and {j} swapped (a transpose, or a view/reshape in the wrong order) {where}"
    for dim in range(g.dim()):
        if g.shape[dim] > 1 and _close(g.flip(dim), e, atol, rtol):
            return f"the {what} is the expected one reversed along dimension {dim} (flipped: an index runs backwards) {where}"
    if finite.all() and g.dim() >= 2 and g.shape[-1] > 1 and (e != 0).all():
        r = g / e
        per_slice = r[..., :1]
        if _close(g, per_slice * e, atol, rtol) and (per_slice.max() - per_slice.min()) > 1e-3 * per_slice.abs().max():
            return (f"the {what} is the expected one with each slice along the last dimension scaled by its own factor {where}: "
                    "a normalisation (the sum, max, mean or norm you divide by) is computed over the wrong values or the wrong dim")
    for dim in range(g.dim()):
        for shift in (1, -1):
            if g.shape[dim] > 2 and _close(g.roll(shift, dim).narrow(dim, 1, g.shape[dim] - 2), e.narrow(dim, 1, e.shape[dim] - 2), atol, rtol):
                return f"the {what} is the expected one shifted by one position along dimension {dim} {where}: an index is off by one"
    if got.numel() > 1 and torch.allclose(g.flatten().sort().values, e.flatten().sort().values, atol=atol, rtol=rtol, equal_nan=True):
        return f"the {what} has the right values in the wrong places {where}: an index, a transpose or a reshape is off"
    if g.dim() >= 1 and g.shape[0] > 1:
        rows = bad.reshape(g.shape[0], -1).any(-1)
        if not rows.all():
            wrong = [int(i) for i in rows.nonzero().flatten()[:6]]
            return f"the {what} differs {where}; only some of the slices along dimension 0 are wrong: {wrong}"
    return f"the {what} differs {where}"


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def difference(got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-5, what: str = "result") -> str | None:
    """``None`` when ``got`` matches ``expected`` (tensors, numbers, strings, or tuples/lists of
    them), else a sentence saying how it differs."""
    if isinstance(got, TimedOut) or isinstance(expected, TimedOut):
        return None if isinstance(got, TimedOut) and isinstance(expected, TimedOut) else f"the {what} never came back"
    if isinstance(got, Raised) or isinstance(expected, Raised):
        return None if str(got) == str(expected) else f"the {what} is {_describe(got)}, expected {_describe(expected)}"
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"the {what} should be a tensor, got {_describe(got)}"
        return _tensor_difference(got, expected, atol, rtol, what)
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"the {what} should be a {type(expected).__name__} of {len(expected)} items, got {_describe(got)}"
        problem = next((p for p in (difference(g, e, atol, rtol, f"{what}[{i}]") for i, (g, e) in enumerate(zip(got, expected))) if p), None)
        if problem and len(got) > 1 and all(difference(g, e, atol, rtol) is None for g, e in zip(list(got)[::-1], expected)):
            return f"the {what}'s two items are swapped (reversed order)" if len(got) == 2 else f"the {what} holds the expected items in reverse order (reversed)"
        return problem
    if isinstance(expected, str):
        if not isinstance(got, str):
            return f"the {what} should be a string, got {_describe(got)}"
        if got == expected:
            return None
        i = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        return (f"the {what} differs from character {i} on: got {got[max(0, i - 15):i + 25]!r}, expected "
                f"{expected[max(0, i - 15):i + 25]!r}")
    if isinstance(expected, bool):
        return None if got is expected or (isinstance(got, bool) and got == expected) else f"the {what} is {_describe(got)}, expected {expected!r}"
    if _is_int(expected):
        if not _is_int(got):
            hint = " (use .item() to turn a one-element tensor into a Python int)" if isinstance(got, torch.Tensor) else \
                (" (an integer computed with / or math.ceil on floats: use integer division // or int(...))" if isinstance(got, float) else "")
            return f"the {what} should be an int, got {_describe(got)}{hint}"
        if got == expected:
            return None
        msg = f"the {what} is {got}, expected {expected} (off by {got - expected:+d}{': an off by one in a count or a bound?' if abs(got - expected) == 1 else ''}"
        if expected and got and (got % expected == 0 or expected % got == 0):
            msg += f", {got / expected:g} times the expected value"
        return msg + ")"
    if isinstance(expected, float):
        if isinstance(got, torch.Tensor):
            return f"the {what} should be a Python float, got {_describe(got)} (use .item())"
        if not isinstance(got, numbers.Real) or isinstance(got, bool):
            return f"the {what} should be a number, got {_describe(got)}"
        if math.isclose(got, expected, rel_tol=max(rtol, 1e-9), abs_tol=atol) or (math.isnan(got) and math.isnan(expected)):
            return None
        msg = f"the {what} is {got!r}, expected {expected!r}"
        if expected and got and math.isfinite(got):
            r = got / expected
            msg += f" ({r:.4g} times the expected value{_name_factor(r)}{_reduction(r)})"
        return msg
    if got != expected:
        return f"the {what} is {_describe(got)}, expected {_describe(expected)}"
    return None


# ---------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------

_ERROR_HINTS = [
    ("cannot be multiplied", "a matrix product's inner sizes differ: nn.Linear and the exercise's weights are stored "
     "(out_features, in_features), so a row vector needs x @ w.T (or F.linear(x, w))"),
    ("must match the size of tensor", "two tensors do not broadcast: print their .shape; a missing axis needs unsqueeze "
     "(or keepdim=True in a sum/max)"),
    ("expected scalar type", "two tensors of different dtypes meet in one operation: cast one with .to(other.dtype)"),
    ("expected m1 and m2 to have the same dtype", "two tensors of different dtypes meet in one operation: cast one with .to(other.dtype)"),
    ("Dimension out of range", "a dim argument is larger than the tensor has dimensions: print the tensor's .shape"),
    ("out of bounds", "an index is outside a tensor's size: print the tensor's .shape and the index"),
    ("out of range", "an index is outside a tensor's size: print the tensor's .shape and the index"),
    ("view size is not compatible", "a view of a non-contiguous tensor (after transpose): use .reshape, or .contiguous().view"),
    ("unexpected keyword argument", None),
    ("positional argument", None),
    ("maximum recursion depth", "the function calls itself without end: check the stopping condition"),
]


def _explain_error(name: str, ex: Exercise, ans: Raised) -> list[str]:
    lines = [f"  your function raised {ans}" + (f"\n  at {ans.where}" if ans.where else "")]
    err = ans.error
    if isinstance(err, SystemExit):
        lines.append("  Hint: sys.exit()/exit() ends the program; a function gives its answer with `return`.")
    elif isinstance(err, TypeError) and "argument" in str(err):
        lines.append(f"  It must take the arguments {name}{ex.signature}.")
    else:
        for needle, hint in _ERROR_HINTS:
            if hint and needle in str(err):
                lines.append(f"  Hint: {hint}.")
                break
    return lines


def _not_attempted(name: str) -> bool:
    print(f"{name}: not attempted yet. Write your function in the cell above (replace the `raise NotImplementedError`), run it, then run this check again.")
    return False


def _matching_mistake(ex: Exercise, cases: Cases, answers: list[Any], expected: list[Any]) -> tuple[str, str] | None:
    """The known mistake that explains the learner's answers: first one that reproduces every answer;
    else one that reproduces every *wrong* answer (a learner who made that mistake but got a case
    right that the mistake's extreme version gets wrong, or who also returns another dtype).
    Mistakes run lazily, case by case, and stop at the first case they do not explain."""
    tol = [ex.tolerances(args) for _, args in cases]
    cache: dict[tuple[int, int], Any] = {}

    def output(m: int, i: int) -> Any:
        if (m, i) not in cache:
            cache[(m, i)] = _call(ex.mistakes[m][0], cases[i][1])
        return cache[(m, i)]

    def explains(m: int, indices: list[int], loose: bool) -> bool:
        try:
            for i in indices:
                out = output(m, i)  # loosely, a mistake must also be wrong where the answer is (not just another dtype)
                if difference(_like(answers[i], out) if loose else answers[i], out, *tol[i]) is not None or \
                        (loose and difference(out, expected[i], *tol[i]) is None):
                    return False
            return True
        except (NotImplementedError, _TimeLimit):
            return False

    # the cases the learner got wrong first: they separate the mistakes fastest
    wrong = [i for i, (a, e, t) in enumerate(zip(answers, expected, tol)) if difference(a, e, *t) is not None]
    order = wrong + [i for i in range(len(cases)) if i not in wrong]
    for m, (_, says, hint) in enumerate(ex.mistakes):
        if explains(m, order, loose=False):
            return says, hint
    for m, (_, says, hint) in enumerate(ex.mistakes):
        if wrong and explains(m, wrong, loose=True):
            return says, hint
    if not wrong:
        return None
    try:  # best effort: a config that refuses a changed field must not stop the diagnosis
        variant = _matching_variant(ex, cases, answers, expected, wrong) or _config_terms(cases, answers, expected, wrong)
    except Exception:
        variant = None
    if variant:
        return variant
    for m, (_, says, hint) in enumerate(ex.mistakes):  # the first wrong case alone: part of the answer's mistakes
        if explains(m, wrong[:1], loose=True):
            return f"{says} (this explains case {wrong[0] + 1}; another mistake may hide in the other cases)", hint
    return None


_CONFIG_VARIANTS = [  # (field, the value to try, the mistake, the hint) for an exercise that takes a config
    ("num_key_value_heads", lambda c: c.num_attention_heads, "num_attention_heads is used where num_key_value_heads belongs "
     "(grouped-query attention: k and v have fewer heads)", "use config.num_key_value_heads for k, v and the cache"),
    ("tie_word_embeddings", lambda c: not c.tie_word_embeddings, "tie_word_embeddings is read the wrong way round (a tied lm_head "
     "IS the embedding matrix)", "count or use a separate lm_head only when config.tie_word_embeddings is False"),
    ("num_hidden_layers", lambda c: 1, "one layer only: num_hidden_layers is not used", "multiply by (or loop over) config.num_hidden_layers"),
]


def _argument_variants(ex: Exercise, args: tuple) -> list[tuple[tuple, str, str]]:
    """The reference's arguments with one of them changed the way a learner's code could misuse it,
    or two of them swapped: (changed args, the mistake, the hint)."""
    names = _argument_names(ex.signature)
    names += [f"argument {i + 1}" for i in range(len(names), len(args))]
    out: list[tuple[tuple, str, str]] = []

    def put(i: int, value: Any, says: str, hint: str = "") -> None:
        out.append((args[:i] + (value,) + args[i + 1:], says, hint or f"use `{names[i]}` as the task says"))

    for i, (a, n) in enumerate(zip(args, names)):
        if isinstance(a, bool):
            put(i, not a, f"`{n}` is read the wrong way round")
        elif isinstance(a, int) and n == "dim":
            for d in {0, 1, -1, -2} - {a}:
                put(i, d, f"the operation runs along dim {d} whatever `dim` says", "use the `dim` argument for every reduction (max, sum)")
        elif isinstance(a, int):
            for d in (1, -1):
                put(i, a + d, f"off by one: your result is what `{n}` {'+' if d > 0 else '-'} 1 gives", f"check how `{n}` is used: a slice end, a loop bound or a count")
            if a not in (0, 1):
                put(i, 1, f"`{n}` is not used (your result is what `{n}` = 1 gives)")
        elif isinstance(a, float):
            if a != 0:
                put(i, 0.0, f"`{n}` is not used (your result is what `{n}` = 0 gives)")
                put(i, 1 / a, f"`{n}` is inverted (your result is what 1 / `{n}` gives): a multiplication where a division belongs, or the reverse")
            if a != 1:
                put(i, 1.0, f"`{n}` is not used (your result is what `{n}` = 1 gives)")
            if a not in (10000.0, 0.0) and n in ("base", "rope_theta"):
                put(i, 10000.0, f"`{n}` is hard-coded to 10000")
        elif isinstance(a, torch.dtype) and a != torch.float32:
            put(i, torch.float32, "the `dtype` argument is ignored: your result is float32 whatever dtype says", "create tensors with dtype=dtype and use torch.finfo(dtype)")
        elif isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel() > 1:
            put(i, -a, f"`{n}` is used with the opposite sign (a sign error)", f"check the sign of every term with `{n}`")
            if n in ("mask", "attention_mask"):
                put(i, torch.zeros_like(a), "the mask is not applied", "add the mask to the scores before the softmax")
        elif hasattr(a, "to_dict") and hasattr(a, "num_attention_heads"):
            for field_name, value, says, hint in _CONFIG_VARIANTS:
                c = copy.deepcopy(a)
                if getattr(c, field_name) != value(c):
                    setattr(c, field_name, value(c))
                    put(i, c, says, hint)
    for (i, a), (j, b) in itertools.combinations(enumerate(args), 2):
        if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype) or \
                (type(a) is type(b) and type(a) in (int, float) and a != b):
            out.append((args[:i] + (b,) + args[i + 1:j] + (a,) + args[j + 1:], f"`{names[i]}` and `{names[j]}` are swapped", "use each where the task says"))
    return out


def _config_terms(cases: Cases, answers: list[Any], expected: list[Any], wrong: list[int]) -> tuple[str, str] | None:
    """For a count computed from a config: the difference, in every wrong case, as one, two, one per layer,
    two per layer (+ 1) of the same block of the model (an RMSNorm weight, a projection, an embedding)."""
    found = set()
    for i in wrong:
        got, exp, c = answers[i], expected[i], next((a for a in cases[i][1] if hasattr(a, "num_attention_heads")), None)
        if c is None or not (_is_int(got) and _is_int(exp)):
            return None
        d, diff, L = c.hidden_size, got - exp, c.num_hidden_layers
        terms = [(c.vocab_size * d, "the embedding matrix or the lm_head (vocab_size x hidden_size)"),
                 (d * c.intermediate_size, "an MLP matrix (hidden_size x intermediate_size)"),
                 (d * c.num_attention_heads * c.head_dim, "a q_proj or o_proj matrix (hidden_size x num_attention_heads * head_dim)"),
                 (d * c.num_key_value_heads * c.head_dim, "a k_proj or v_proj matrix (hidden_size x num_key_value_heads * head_dim)"),
                 (d, "an RMSNorm weight (hidden_size values)")]
        match = [(diff // size, what) for size, what in terms if size and diff % size == 0 and abs(diff // size) in (1, 2, L, 2 * L, 2 * L + 1)]
        found.add((match[0][1], "missing" if diff < 0 else "extra") if match else None)
    what, how = found.pop() if len(found) == 1 and None not in found else (None, None)
    return None if what is None else (f"your count is off by a whole number of {what}: some of them are {how} (once, or once per layer)",
            "list the weights of one layer (4 attention projections, 3 MLP matrices, 2 norms) and the model's own (embedding, final norm, lm_head unless tied)")


def _matching_variant(ex: Exercise, cases: Cases, answers: list[Any], expected: list[Any], wrong: list[int]) -> tuple[str, str] | None:
    """A misused argument that explains every answer: the reference on changed arguments gives what the
    learner's function gave, on the wrong cases and on the right ones. Only variants of the first wrong case's
    arguments that reproduce its answer are carried to the other cases."""
    variants: dict[int, list[tuple[tuple, str, str]]] = {}

    def reproduces(i: int, says: str) -> bool:  # no such variant (the argument is 0 already): fine where the answer is right
        if i not in variants:
            variants[i] = _argument_variants(ex, cases[i][1])
        changed = next((v[0] for v in variants[i] if v[1] == says), None)
        if changed is None:
            return i not in wrong
        out, tol = _call(ex.reference, changed), ex.tolerances(cases[i][1])  # an error counts too: the same as the answer's
        return not isinstance(out, TimedOut) and difference(_like(answers[i], out), out, *tol) is None and \
            (i not in wrong or difference(out, expected[i], *tol) is not None)

    order = wrong + [i for i in range(len(cases)) if i not in wrong]
    for _, says, hint in _argument_variants(ex, cases[wrong[0]][1]):
        if all(reproduces(i, says) for i in order):
            return says, hint
    return None


def _like(answer: Any, model: Any) -> Any:
    """``answer`` cast to the float dtype of ``model`` (tensors, or tuples of them)."""
    if isinstance(answer, torch.Tensor) and isinstance(model, torch.Tensor) and answer.is_floating_point() and model.is_floating_point():
        return answer.to(model.dtype)
    if isinstance(answer, (tuple, list)) and isinstance(model, (tuple, list)) and len(answer) == len(model):
        return type(answer)(_like(a, m) for a, m in zip(answer, model))
    return answer


def _timed_out(name: str, n: int, total: int, label: str, t: TimedOut) -> list[str]:
    lines = [f"{name}: not right yet. Case {n} of {total} ({label}): your function did not return within {t.seconds:g} s."]
    if t.stopped:
        lines.append("  It was stopped. Look for a loop whose condition never becomes false (a `while` whose "
                     "index is not advanced, a `range` over a huge number).")
    else:
        lines.append("  It is stuck in one long computation and still runs in the background; restart the kernel "
                     "to stop it. Check the sizes you create (a tensor of a huge size, a loop over a large range).")
    lines.append(f"  (The limit is check({name!r}, fn, timeout=SECONDS).)")
    return lines


def check(name: str, fn: Callable | None, timeout: float | None = None) -> bool:
    """Run the learner's ``fn`` for exercise ``name`` on all its inputs and compare with the
    reference. Prints "not attempted yet", a diagnosis (which input, what differs, the likely
    mistake and a hint) or "correct"; returns True only when every input gives the expected
    result and no input was changed in place. Never raises (except KeyboardInterrupt); each call
    of ``fn`` may take ``timeout`` seconds (default :data:`DEFAULT_TIMEOUT`)."""
    try:
        return _check(name, fn, _timeout(timeout), verbose=True).passed
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # never stop the learner's notebook because of the checker
        print(f"{name}: the checker could not finish ({type(e).__name__}: {e}).")
        return False


@dataclass
class Verdict:
    """What ``check`` found: passed, not attempted, and the text it printed (the diagnosis)."""

    passed: bool
    attempted: bool
    text: str


class _Printer:
    def __init__(self, verbose: bool) -> None:
        self.lines: list[str] = []
        self.verbose = verbose

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if self.verbose:
            print(line)


def _check(name: str, fn: Callable | None, timeout: float, verbose: bool = True) -> Verdict:
    """check()'s body; returns a :class:`Verdict` (the grader uses the text as the diagnosis)."""
    say = _Printer(verbose)

    def verdict(passed: bool, attempted: bool = True) -> Verdict:
        return Verdict(passed, attempted, "\n".join(say.lines))

    def not_attempted() -> Verdict:
        say(f"{name}: not attempted yet. Write your function in the cell above (replace the `raise NotImplementedError`), run it, then run this check again.")
        return verdict(False, attempted=False)

    ex = EXERCISES.get(name)
    if ex is None:
        say(f"check: there is no exercise called {name!r}; the exercises are: {', '.join(sorted(EXERCISES))}")
        return verdict(False, attempted=False)
    if fn is None:
        return not_attempted()
    if not callable(fn):
        say(f"{name}: pass your function itself, check({name!r}, my_function), not {_describe(fn)}.")
        return verdict(False)
    cases = ex.cases()
    # The reference first, on pristine copies; `cases` itself is never handed to anyone.
    expected = [_call(ex.reference, args) for _, args in cases]
    for n, ((label, _), exp) in enumerate(zip(cases, expected), start=1):
        if isinstance(exp, Raised):  # a bug in the exercise, not in the answer
            say(f"{name}: the checker itself failed on case {n} ({label}): {exp}. Please report this.")
            return verdict(False)
    answers, mutations = [], []
    for n, (label, args) in enumerate(cases, start=1):
        mine = _copy(args)
        ans = _limited(fn, mine, timeout)
        if isinstance(ans, TimedOut):
            for line in _timed_out(name, n, len(cases), label, ans):
                say(line)
            return verdict(False)
        if isinstance(ans, Raised) and isinstance(ans.error, NotImplementedError):
            return not_attempted()
        answers.append(ans)
        mutations.append(_mutation(ex, args, mine))
    for n, ((label, args), ans, exp, changed) in enumerate(zip(cases, answers, expected, mutations), start=1):
        if ans is None and exp is not None:
            say(f"{name}: case {n} of {len(cases)} ({label}) returned None. Did you forget the `return`?")
            return verdict(False)
        problem = difference(ans, exp, *ex.tolerances(args))
        if problem is None and changed is None:
            continue
        say(f"{name}: not right yet. Case {n} of {len(cases)} ({label}):")
        if problem is not None:
            if isinstance(ans, Raised):
                for line in _explain_error(name, ex, ans):
                    say(line)
            else:
                say(f"  {problem}.")
            mistake = _matching_mistake(ex, cases, answers, expected)
            if mistake:
                say(f"  Likely mistake: {mistake[0]}.")
                say(f"  Hint: {mistake[1]}.")
        if changed is not None:
            say(f"  Your function changed its input: {changed}. The caller's tensors, layers and configs must stay as they were: "
                "work on new tensors (y = x * 2, not x *= 2 or x[...] = ...; .clone() first if you must write in place).")
        return verdict(False)
    if ex.also is not None:
        problem = _limited(ex.also, (fn,), timeout)
        if isinstance(problem, (TimedOut, Raised)):
            problem = f"a further check of how it works did not finish ({problem if isinstance(problem, Raised) else 'time limit'})"
        if problem:
            say(f"{name}: the values are right, but {problem}.")
            return verdict(False)
    say(f"{name}: correct on all {len(cases)} cases ({', '.join(label for label, _ in cases)}).")
    return verdict(True)


def check_function(learner_fn: Callable | None, reference_fn: Callable, inputs: list[tuple], name: str = "your function",
                   atol: float = 1e-5, rtol: float = 1e-5, timeout: float | None = None) -> bool:
    """Compare ``learner_fn(*args)`` with ``reference_fn(*args)`` for ad-hoc inputs, without a
    registered exercise (no diagnosis of mistakes). Prefer :func:`check`."""
    if learner_fn is None:
        return _not_attempted(name)
    try:
        for n, args in enumerate(inputs, start=1):
            expected = _call(reference_fn, args)
            got = _limited(learner_fn, _copy(args), _timeout(timeout))
            if isinstance(got, Raised) and isinstance(got.error, NotImplementedError):
                return _not_attempted(name)
            if isinstance(got, TimedOut):
                print(f"{name}: case {n} of {len(inputs)}: did not return within {got.seconds:g} s.")
                return False
            problem = difference(got, expected, atol, rtol)
            if problem:
                print(f"{name}: case {n} of {len(inputs)}: {problem}.")
                return False
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        print(f"{name}: the checker could not finish ({type(e).__name__}: {e}).")
        return False
    print(f"{name}: correct on all {len(inputs)} cases.")
    return True


def list_exercises(notebook: str | None = None) -> None:
    """Print the exercises (of one notebook, e.g. ``"03"``, or all): name, signature, task."""
    for ex in EXERCISES.values():
        if notebook is None or ex.notebook.startswith(notebook):
            print(f"{ex.notebook:28s} {ex.name}{ex.signature}: {ex.task}")
