"""Exercises of notebook 16_beyond_one_machine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ...training.distributed import Parallel, local_rows
from ...pretraining_tp import SlicedLinear

from .checking import Cases, register, _gen


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
    return [(f"{w} rank{'s' if w > 1 else ''}", (torch.randn(2, 5, 8, generator=g), torch.randn(6, 8, generator=g), w)) for w in (1, 2, 4)]


class _Products(torch.overrides.TorchFunctionMode):
    """Records the inner (summed-over) size of every matrix product run inside it."""

    _OPS = {torch.matmul, torch.mm, torch.bmm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.__matmul__, F.linear}

    def __init__(self) -> None:
        super().__init__()
        self.inner: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._OPS and args and isinstance(args[0], torch.Tensor):
            self.inner.append(args[0].shape[-1])
        return func(*args, **(kwargs or {}))


def _row_parallel_is_split(fn) -> str | None:
    """Plain F.linear(x, weight) gives the same numbers; the exercise is to split the product."""
    g = _gen(160)
    x, weight, world = torch.randn(2, 3, 8, generator=g), torch.randn(6, 8, generator=g), 4
    with _Products() as seen:
        fn(x, weight, world)
    whole = [n for n in seen.inner if n == x.shape[-1]]
    if whole:
        return (f"one matrix product runs over all {x.shape[-1]} input features at once, as a single device would; "
                f"each of the {world} ranks holds only {x.shape[-1] // world} of them: multiply each block of x "
                "by its block of weight's columns, then add the partial products (the all-reduce)")
    return None


register(
    "row_parallel_linear", "16_beyond_one_machine", "(x, weight, world)",
    "F.linear(x, weight) computed as `world` ranks would: weight's columns and x's last dimension split in world blocks, the partial products summed",
    reference=_row_parallel_reference,
    cases=_row_parallel_cases,
    also=_row_parallel_is_split,
    mistakes=[
        (lambda x, weight, world: sum(F.linear(xi, wi) for xi, wi in zip(x.chunk(world, -1), weight.chunk(world, -1))) / world,
         "the partial products are averaged, not summed", "an all-reduce SUMS the ranks' partial results: drop the division"),
        (lambda x, weight, world: F.linear(x.chunk(world, -1)[0], weight.chunk(world, 1)[0]),
         "this is one rank's partial product only: the all-reduce that adds the other ranks' is missing",
         "compute the product for every block pair and add them all"),
    ],
)
