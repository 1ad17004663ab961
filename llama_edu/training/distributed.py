"""Training on several devices with torch.distributed: data parallel (DDP), sharded data
parallel (FSDP2) and tensor parallelism (DTensor), alone or FSDP and TP together.

Three ways to split the work of one training step over N processes ("ranks"):

* **DDP** (``DistributedDataParallel``): every rank holds the whole model and optimizer and
  takes 1/N of the batch. After the backward pass the gradients are averaged with one
  all-reduce, so every rank takes the same optimizer step and the weights stay identical.
* **FSDP** (``torch.distributed.fsdp.fully_shard``, ZeRO-3): every rank keeps only 1/N of each
  parameter, its gradient and its Adam states. Before a decoder layer runs, its full weights are
  all-gathered; after it ran they are freed again; in the backward pass they are gathered once
  more and the gradients are reduce-scattered, so each rank receives the averaged 1/N it owns.
* **TP** (``torch.distributed.tensor.parallel``, Megatron-LM's split, Shoeybi et al. 2019): every
  rank holds 1/N of the heads and 1/N of the feed-forward width. q/k/v and gate/up are split by
  output rows ("column-wise"), o and down by input columns ("row-wise"), so each layer needs one
  all-reduce after attention and one after the feed-forward, and every rank sees the whole batch.
  This is the real version of the config's ``pretraining_tp``, which only emulates the split's
  rounding on one device.
* **FSDP+TP**: a 2-D device mesh ``(dp, tp)``; TP inside each row of ``tp`` ranks (one node's
  fast links, in practice), FSDP across the rows.

Everything here is torch.distributed's own machinery; this module only chooses the plan,
checks its preconditions with clear errors, and gives the training loop what it needs: the
rank's share of each batch, a gradient-norm clip that works on sharded gradients, a loss
averaged over ranks, a consolidated Hugging Face-layout checkpoint, and sharded checkpoints
(``torch.distributed.checkpoint``) that load on any number of ranks.

Launch (the ``train`` command with ``--parallel``)::

    torchrun --nproc_per_node 2 -m llama_edu train --data input.txt --out runs/x --parallel fsdp

Several machines: the same line on every node, with a rendezvous point::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --rdzv-id run1 -m llama_edu train ... --parallel fsdp+tp --tp-size 8
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import LlamaConfig
from ..modeling import LlamaForCausalLM

STRATEGIES = ("ddp", "fsdp", "tp", "fsdp+tp")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_joined = False  # init_parallel created this process's group (see exit_rank)


# ----------------------------------------------------------------------------- set-up
@dataclass
class Parallel:
    """What a rank needs to know about the run it is part of.

    ``mesh`` is the DeviceMesh (1-D named ``dp`` or ``tp``; 2-D ``(dp, tp)`` for fsdp+tp).
    Data-parallel ranks see different rows of each batch; the ``tp`` ranks of one group see
    the same rows. ``dp_size * tp_size == world_size``.
    """

    strategy: str
    rank: int
    world_size: int
    device: torch.device
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    dp_size: int
    dp_rank: int
    tp_size: int

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates, draws the progress bar and writes the HF-layout checkpoint."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) is set."""
    return all(name in os.environ for name in TORCHRUN_VARS)


def init_parallel(strategy: str, config: LlamaConfig, device: str | torch.device = "cpu", tp_size: int | None = None) -> Parallel:
    """Join the process group torchrun set up and build the device mesh for ``strategy``.

    The backend follows the device: NCCL on CUDA (one GPU per rank: ``cuda:LOCAL_RANK``), gloo
    on CPU. ``tp_size`` is the tensor-parallel group size for ``fsdp+tp`` (default: the largest
    proper divisor of N that divides the head counts); ``tp`` uses all N ranks.
    Raises ValueError when not launched by torchrun, or when N does not fit the model.
    """
    global _joined
    if strategy not in STRATEGIES:
        raise ValueError(f"--parallel must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not launched_by_torchrun():
        missing = [n for n in TORCHRUN_VARS if n not in os.environ]
        raise ValueError(
            f"--parallel {strategy} needs one process per device, started by torchrun (missing {', '.join(missing)}): "
            f"run `torchrun --nproc_per_node N -m llama_edu train ... --parallel {strategy}`, or drop --parallel"
        )
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    tp = check_parallel_shape(strategy, config, world_size, tp_size)
    if not dist.is_initialized():
        # Imported before the group exists: torch.distributed.nn (which checkpoint imports) binds
        # group.WORLD as a default argument when it is imported, and would keep the group alive.
        importlib.import_module("torch.distributed.checkpoint")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _joined = True
    from torch.distributed.device_mesh import init_device_mesh

    if strategy == "fsdp+tp":
        mesh = init_device_mesh(device.type, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))
        dp_rank = mesh["dp"].get_local_rank()
    elif strategy == "tp":
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("tp",))
        dp_rank = 0
    else:
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
        dp_rank = rank
    return Parallel(strategy, rank, world_size, device, mesh, world_size // tp, dp_rank, tp)


def check_parallel_shape(strategy: str, config: LlamaConfig, world_size: int, tp_size: int | None = None) -> int:
    """The tensor-parallel size for ``strategy`` on ``world_size`` ranks (1 for ddp/fsdp),
    or a ValueError naming what does not divide."""
    if strategy in ("ddp", "fsdp"):
        if tp_size not in (None, 1):
            raise ValueError(f"--tp-size {tp_size} applies to --parallel tp or fsdp+tp, not {strategy}")
        return 1
    if strategy == "tp":
        if tp_size not in (None, world_size):
            raise ValueError(f"--parallel tp splits over all {world_size} ranks; use fsdp+tp for --tp-size {tp_size}")
        tp = world_size
    else:
        if tp_size is None:
            fits = [t for t in range(2, world_size) if world_size % t == 0 and _heads_divisible(config, t)]
            if not fits:
                raise ValueError(
                    f"--parallel fsdp+tp needs N = dp x tp with both at least 2 and tp dividing the heads "
                    f"({config.num_attention_heads}) and kv heads ({config.num_key_value_heads}); N = {world_size} "
                    "has no such split: start 4 or more processes, or use --parallel fsdp or tp"
                )
            tp = max(fits)
        else:
            tp = tp_size
            if tp < 2 or world_size % tp or world_size // tp < 2:
                raise ValueError(f"--tp-size {tp} must be at least 2 and divide N = {world_size} into at least 2 data-parallel groups")
    if config.num_attention_heads % tp or config.num_key_value_heads % tp:
        raise ValueError(
            f"tensor parallelism over {tp} ranks splits the heads evenly, but num_attention_heads = "
            f"{config.num_attention_heads} and num_key_value_heads = {config.num_key_value_heads} are not both "
            f"divisible by {tp}: use a rank count that divides both"
        )
    if config.pretraining_tp != 1:
        raise ValueError(f"pretraining_tp = {config.pretraining_tp} emulates a split on one device; set it to 1 for real tensor parallelism")
    return tp


def _heads_divisible(config: LlamaConfig, tp: int) -> bool:
    return config.num_attention_heads % tp == 0 and config.num_key_value_heads % tp == 0


def spawn(fn, nprocs: int, *args: Any) -> None:
    """Run ``fn(rank, nprocs, *args)`` in ``nprocs`` local processes started as torchrun starts
    them (the RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT variables, a free port), one
    thread each; for tests and benchmarks on one machine. ``fn`` must be importable (defined at
    module level) and the caller guarded by ``if __name__ == "__main__"`` in a script."""
    import torch.multiprocessing as mp  # only here: tests and benchmarks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(nprocs, port, fn, args), nprocs=nprocs, join=True)


def _spawned(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    finally:
        shutdown()
    exit_rank(0)


def is_main() -> bool:
    """True in a single process and on rank 0 of a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shutdown() -> None:
    """Leave the process group (at the end of a run, on every rank). gloo's worker threads end
    here once nothing else refers to the group (see :func:`exit_rank`)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # a model or mesh in a reference cycle (an exception's traceback) may hold the group


def exit_rank(code: int) -> None:
    """End a process that joined a process group (a torchrun rank) now, with exit status
    ``code``; in any other process, return at once.

    Python's own exit is skipped on purpose. gloo's worker threads live as long as anything
    refers to the group (DTensor caches the meshes of FSDP and TP runs), and a worker that
    drops a tensor while Python finalizes cannot take the GIL: the rank aborts with SIGABRT
    ("terminate called without an active exception") after a run that succeeded, about one run
    in 40 on 2 busy cores. Everything a run writes is closed by then; the standard streams are
    flushed here.
    """
    if not _joined:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------- the plans
def apply_tensor_parallel(model: LlamaForCausalLM, tp_mesh: Any) -> LlamaForCausalLM:
    """Split every decoder layer over ``tp_mesh`` (in place) and return the model.

    q/k/v and gate/up are ``ColwiseParallel``: each rank computes its own heads and its own
    slice of the feed-forward width from the full (replicated) input. o and down are
    ``RowwiseParallel``: each rank multiplies its slice and the partial sums are all-reduced,
    which returns a full, replicated hidden state. Embeddings, norms and the LM head stay
    replicated. The attention modules read their (local) head counts from the projections'
    outputs, so they need no change.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    check_parallel_shape("tp", model.config, tp)
    # The normalised hidden state enters attention and the MLP as one replicated DTensor, so
    # q, k and v (gate and up) share it and the backward pass sums their input gradients
    # across ranks once per block (Megatron's "f"), not once per projection.
    # (self_attn's other positional inputs, cos, sin, mask, cache, cache_position,
    # output_attentions, pass as they are.)
    attn_inputs = (Replicate(), None, None, None, None, None, None)
    plan = {
        "self_attn": PrepareModuleInput(input_layouts=attn_inputs, desired_input_layouts=attn_inputs, use_local_output=False),
        "mlp": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),), use_local_output=False),
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(), "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    for layer in model.get_base_model().layers:
        # LlamaAttention takes its head counts from the projections' outputs, so the same code
        # runs on this rank's share of the heads.
        parallelize_module(layer, tp_mesh, plan)
    return model


def apply_fsdp(model: LlamaForCausalLM, dp_mesh: Any) -> LlamaForCausalLM:
    """Shard the model over ``dp_mesh`` with FSDP2 (in place): one ``fully_shard`` unit per
    decoder layer, whose weights are gathered just before it runs and freed after, then the root,
    which owns what is left (embeddings, final norm, LM head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_base_model().layers:
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model


def parallelize(model: LlamaForCausalLM, par: Parallel) -> nn.Module:
    """Apply ``par.strategy`` to a model already on ``par.device`` with the same initial
    weights on every rank. Returns the module to train (a DDP wrapper for ddp, the model itself,
    changed in place, otherwise). Build the optimizer after this call."""
    if par.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [par.device.index] if par.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if par.strategy == "fsdp":
        return apply_fsdp(model, par.mesh)
    if par.strategy == "tp":
        return apply_tensor_parallel(model, par.mesh)
    apply_tensor_parallel(model, par.mesh["tp"])
    return apply_fsdp(model, par.mesh["dp"])


def unwrap(model: nn.Module) -> LlamaForCausalLM:
    """The LlamaForCausalLM inside a DDP wrapper (FSDP and TP change the model in place)."""
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------- the step
def local_rows(x: torch.Tensor, par: Parallel | None) -> torch.Tensor:
    """This rank's rows of a global batch: rows ``dp_rank * B/dp ... (dp_rank + 1) * B/dp``.

    Every rank draws the same global batch (same seed), so N ranks see exactly the rows one
    process would, and the gradient averaged over ranks is the one-process gradient."""
    if par is None or par.dp_size == 1:
        return x
    check_batch_divides(x.shape[0], par.dp_size)
    n = x.shape[0] // par.dp_size
    return x[par.dp_rank * n : (par.dp_rank + 1) * n]


def check_batch_divides(batch_size: int, dp_size: int) -> None:
    if batch_size % dp_size:
        raise ValueError(
            f"--batch-size {batch_size} is the global batch and must split evenly over the {dp_size} data-parallel "
            f"ranks; use a multiple of {dp_size}"
        )


def mean_over_ranks(value: torch.Tensor | float, par: Parallel | None) -> float:
    """The average of a scalar (a rank's loss) over the data-parallel ranks: the loss of the
    whole global batch, the number one process would log."""
    if par is None or par.world_size == 1:
        return float(value)
    t = torch.as_tensor(float(value), dtype=torch.float64, device=par.device)
    dist.all_reduce(t)  # sum over all ranks; tp ranks of a group hold the same value
    return t.item() / par.world_size


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """Scale the gradients so their global 2-norm is at most ``max_norm``; return the norm
    before clipping (what ``torch.nn.utils.clip_grad_norm_`` does on one device).

    Works on any mix of plain and sharded (DTensor) gradients: the squared norm of a sharded
    gradient is the sum of its shards' squared norms, so each rank sums the squares of what it
    holds, and one all-reduce per kind of sharding (over the mesh dimensions it is sharded on)
    adds the other shards. Replicated gradients are the same on every rank and are not summed.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    sums: dict[tuple, torch.Tensor] = {}  # (mesh, sharded mesh dims) -> local sum of squares
    meshes: dict[tuple, Any] = {}
    for g in grads:
        key: tuple = ()
        if isinstance(g, DTensor):
            # Shard, and FSDP-over-TP's _StridedShard, split the tensor; Replicate does not.
            dims = tuple(i for i, p in enumerate(g.placements) if not (p.is_replicate() or p.is_partial()))
            key = (id(g.device_mesh), dims) if dims else ()
            meshes[key] = g.device_mesh
            g = g.to_local()
        sums[key] = sums.get(key, 0) + g.detach().double().pow(2).sum()
    total_sq = torch.zeros((), dtype=torch.float64)
    for key, sq in sums.items():
        if key:
            mesh, dims = meshes[key], key[1]
            for d in dims:
                dist.all_reduce(sq, group=mesh.get_group(d))
        total_sq = total_sq + sq.cpu()
    total = total_sq.sqrt().item()
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def local_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank actually holds (its own
    shards for DTensors; a tied weight once), to check :func:`llama_edu.course.costs.per_rank_memory` against."""
    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = {id(p): p for p in model.parameters()}.values()
    out = {"params": sum(nbytes(p) for p in params), "grads": sum(nbytes(p.grad) for p in params if p.grad is not None), "optim": 0}
    if optimizer is not None:
        for state in optimizer.state.values():
            out["optim"] += sum(nbytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    out["total"] = out["params"] + out["grads"] + out["optim"]
    return out


def no_sync(model: nn.Module, sync: bool):
    """A context for one micro-batch of gradient accumulation: when ``sync`` is False the
    gradients are only accumulated locally (DDP's ``no_sync``; FSDP2's
    ``set_requires_gradient_sync(False)``), and the last micro-batch, with ``sync``, averages
    them over the ranks once. A plain model ignores it."""
    if sync:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def any_rank(flag: bool, par: Parallel | None) -> bool:
    """True on every rank when ``flag`` is True on any (a Ctrl-C seen by one rank stops all at
    the same step, so none is left waiting in a collective)."""
    if par is None:
        return flag
    t = torch.tensor(int(flag), device=par.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def on_main(fn, par: Parallel | None) -> Any:
    """Run ``fn()`` on rank 0 only (file-system work: checking and writing OUT), then make every
    rank raise the same error if it failed, so no rank is left waiting. Returns fn's result on
    rank 0, None elsewhere. Collective."""
    if par is None:
        return fn()
    result, error = None, None
    if par.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - handed to every rank below
            error = e
    box = [None if error is None else (type(error).__name__, str(error))]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        if error is not None:
            raise error
        kind, message = box[0]
        raise (ValueError if kind == "ValueError" else RuntimeError)(f"rank 0: {message}")
    return result


def broadcast_object(obj: Any, par: Parallel | None) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if par is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- checkpoints
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors, on rank 0 (other ranks get an empty
    dict). Every rank must call it: sharded weights are gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def hf_shell(model: nn.Module) -> LlamaForCausalLM:
    """A LlamaForCausalLM on the meta device with ``model``'s config: what ``save_pretrained``
    needs besides a state dict (the config and the class name; FSDP renames the class)."""
    with torch.device("meta"):
        return LlamaForCausalLM(unwrap(model).config)


def load_full_state(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load whole (unsharded) tensors, e.g. from an HF checkpoint, into a sharded or plain model:
    each rank keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(unwrap(model), state_dict, options=StateDictOptions(full_state_dict=True))


def load_one_process_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load an optimizer state dict saved by one process (``optimizer.state_dict()``, keyed by
    parameter position) into the optimizer of a parallel model built the same way: positions
    become parameter names, and each rank keeps the shards of the moments it owns."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = {order[int(i)]: s for i, s in saved["state"].items()}
    groups = [{**g, "params": [order[int(i)] for i in g["params"]]} for g in saved["param_groups"]]
    set_optimizer_state_dict(unwrap(model), optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def save_consolidated(model: nn.Module, out_dir: str | os.PathLike, par: Parallel | None) -> None:
    """Write the whole model to ``out_dir`` in the Hugging Face layout, as one process would
    (``config.json`` + ``model.safetensors``; ours and transformers' ``from_pretrained`` load it).
    Collective: call on every rank; rank 0 writes."""
    sd = full_state_dict(model)
    on_main(lambda: hf_shell(model).save_pretrained(out_dir, state_dict=sd), par)


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model and optimizer state as DCP wants it: each rank's own shards (DTensors),
    keyed by parameter names, not by optimizer indices, so another layout can load it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Every rank writes its own shards of the model and the optimizer to the folder ``path``
    (``torch.distributed.checkpoint``: ``.metadata`` + one ``__R_0.distcp`` file per rank).
    Nothing is gathered, so this scales to models no single rank could hold. Collective."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(model, optimizer), checkpoint_id=str(path))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Load a :func:`save_sharded` checkpoint into ``model`` and ``optimizer``, whatever the
    number of ranks or the strategy that wrote it (DCP reshards: each rank reads the byte
    ranges of the saved shards that overlap its own). Works in a single process too."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a torch.distributed.checkpoint folder (no .metadata); save one with save_sharded")
    state = sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


# ----------------------------------------------------------------------------- measuring traffic
class CollectiveCounter(TorchDispatchMode):
    """Counts the calls to torch.distributed's collectives and the bytes of the tensors they
    carry, by watching the ``c10d`` operators as they are dispatched (DDP's all-reduce, FSDP's
    all-gathers and reduce-scatters, DTensor's all-reduces all go through them)::

        with CollectiveCounter() as counter:
            train_step(model, optimizer, micro_batches)  # llama_edu.training.loop
        counter.bytes  # {"allreduce_": n, ...}

    For an all-gather the bytes are the gathered output, for a reduce-scatter the full input,
    for an all-reduce the reduced tensor (the "payload" of :func:`llama_edu.course.costs.bytes_per_step`).
    """

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            name = func._schema.name.split("::")[-1]
            kind = _collective_kind(name)
            if kind is not None:
                self.calls[kind] = self.calls.get(kind, 0) + 1
                self.bytes[kind] = self.bytes.get(kind, 0) + _collective_bytes(kind, func.namespace == "c10d", args)
        return func(*args, **kwargs)


def _collective_kind(name: str) -> str | None:
    """"all_reduce", "all_gather", "reduce_scatter", "broadcast" for a c10d operator name
    (``allreduce_``, ``_allgather_base_``, ``reduce_scatter_tensor``, ...), else None."""
    plain = name.strip("_").replace("_base", "").replace("_", "")
    for kind in ("allreduce", "allgather", "reducescatter", "broadcast"):
        if plain.startswith(kind):
            return {"allreduce": "all_reduce", "allgather": "all_gather", "reducescatter": "reduce_scatter"}.get(kind, kind)
    return None


def _collective_bytes(kind: str, in_place_op: bool, args: tuple) -> int:
    """Bytes of the full tensor a collective combines, read from its arguments. In-place c10d
    ops take (outputs, inputs, ...) for gathers and reduce-scatters and (tensors, ...) for the
    rest; functional ops take (input, ..., group_size, group_name)."""
    def size(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(size(t) for t in x)
        return 0

    if in_place_op:
        return size(args[1]) if kind == "reduce_scatter" else size(args[0])
    if kind == "all_gather":
        return size(args[0]) * int(args[1])  # the input times group_size
    return size(args[0])
