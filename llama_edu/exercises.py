"""Checkers for the notebooks' "Your turn" exercises.

A checker runs the learner's function on a few inputs, compares each result with the package's
reference implementation, and prints what is wrong (shape, dtype or values, with the first
mismatching index) or that it is correct. It returns ``True``/``False`` rather than raising, so
an unfinished exercise never stops the rest of the notebook; solution cells ``assert`` it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"[:200]


def compare(got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-5, what: str = "result") -> str | None:
    """Return ``None`` when ``got`` matches ``expected``, else a sentence saying how it differs."""
    if isinstance(expected, (tuple, list)) and not isinstance(got, torch.Tensor):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"the {what} should be a sequence of {len(expected)} items, got {_describe(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            problem = compare(g, e, atol, rtol, f"{what}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"the {what} should be a tensor, got {_describe(got)}"
        if got.shape != expected.shape:
            return f"the {what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        if got.dtype != expected.dtype:
            return f"the {what} has dtype {got.dtype}, expected {expected.dtype}"
        if expected.is_floating_point():
            bad = ~torch.isclose(got, expected, atol=atol, rtol=rtol)
        else:
            bad = got != expected
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            return (
                f"the {what} differs at index {idx}: got {got[idx].item():.6g}, expected "
                f"{expected[idx].item():.6g} ({int(bad.sum())} of {bad.numel()} values differ)"
            )
        return None
    if got != expected:
        return f"the {what} is {_describe(got)}, expected {_describe(expected)}"
    return None


def check_function(
    learner_fn: Callable | None,
    reference_fn: Callable,
    inputs: Iterable[tuple],
    atol: float = 1e-5,
    rtol: float = 1e-5,
    name: str | None = None,
) -> bool:
    """Compare ``learner_fn(*args)`` with ``reference_fn(*args)`` for every ``args`` in ``inputs``.

    Prints one line: "not attempted yet", the first problem found, or that all cases pass.
    """
    name = name or getattr(reference_fn, "__name__", "your function")
    inputs = list(inputs)
    if learner_fn is None:
        print(f"{name}: not attempted yet. Fill in the cell above and run it again.")
        return False
    for n, args in enumerate(inputs):
        expected = reference_fn(*args)
        try:
            got = learner_fn(*args)
        except NotImplementedError:
            print(f"{name}: not attempted yet. Fill in the cell above and run it again.")
            return False
        except Exception as e:  # show the learner their own error, briefly
            print(f"{name}: case {n + 1} raised {type(e).__name__}: {e}")
            return False
        if got is None or got is Ellipsis:
            print(f"{name}: case {n + 1} returned {got!r}; did you forget a `return`?")
            return False
        problem = compare(got, expected, atol, rtol)
        if problem:
            print(f"{name}: case {n + 1}: {problem}.")
            return False
    print(f"{name}: correct on all {len(inputs)} cases.")
    return True
