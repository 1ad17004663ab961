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
        (lambda batch, rank, world: batch[rank * (batch.shape[0] // world): (rank + 1) * (batch.shape[0] // world) + 1],
         "one row too many (off by one at the slice end): a slice end is already exclusive", "batch[rank * n:(rank + 1) * n] with n = B // world"),
        (lambda batch, rank, world: batch[(rank + 1) * (batch.shape[0] // world): (rank + 2) * (batch.shape[0] // world)],
         "ranks are counted from 1 (off by one): rank 0 takes the first block", "batch[rank * n:(rank + 1) * n]"),
        (lambda batch, rank, world: batch[:, rank * (batch.shape[1] // world): (rank + 1) * (batch.shape[1] // world)],
         "the batch is split along dim 1 (the tokens); data parallelism splits the rows, dim 0", "batch[rank * n:(rank + 1) * n] along dim 0"),
        (lambda batch, rank, world: batch[rank * batch.shape[0] / world:(rank + 1) * batch.shape[0] / world],
         "B / world is a float and slice indices must be integers: use integer division //", "n = batch.shape[0] // world"),
        (lambda batch, rank, world: batch, "every rank takes the whole batch: data parallelism splits it", "batch[rank * n:(rank + 1) * n]"),
        (lambda batch, rank, world: batch[rank * (batch.shape[0] // world): (rank + 1) * (batch.shape[0] // world) - 1],
         "one row too few (off by one at the slice end: - 1): a slice end is already exclusive", "batch[rank * n:(rank + 1) * n]"),
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
        (lambda x, weight, world: torch.cat([F.linear(xi, wi) for xi, wi in zip(x.chunk(world, -1), weight.chunk(world, -1))], -1),
         "the partial products are concatenated; each is a full-size partial sum that the all-reduce adds", "sum the partial products"),
        (lambda x, weight, world: sum(xi @ wi for xi, wi in zip(x.chunk(world, -1), weight.chunk(world, -1))),
         "each block of the weight is not transposed: weight is (out, in), so a block needs xi @ wi.T", "F.linear(xi, wi) or xi @ wi.T"),
        (lambda x, weight, world: sum(F.linear(xi, wi) for xi, wi in zip(x.chunk(world, -1), weight.chunk(world, 0))),
         "weight.chunk(world, 0) splits the output rows; row parallelism splits the weight's columns (dim 1), matching x's last dimension",
         "weight.chunk(world, dim=1)"),
        (lambda x, weight, world: torch.cat([F.linear(x, wi) for wi in weight.chunk(world, 0)], -1) if world > 1 else F.linear(x, weight) * 0,
         "the weight is split along its rows (output features, dim 0), as column parallelism does; row parallelism splits its columns (input features, dim 1)",
         "weight.chunk(world, dim=1), each block paired with the matching block of x's last dimension"),
    ],
)
