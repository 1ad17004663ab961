"""The exercise machinery: the registry, and ``check``, which runs an answer against the package's
own function and says why it differs (see the package docstring for how to add an exercise)."""

from __future__ import annotations
import math
from dataclasses import dataclass, field
from typing import Any, Callable
import torch

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
