"""Cost models for notebook 16: bytes of memory per rank and bytes sent per step under DDP, FSDP and
tensor parallelism, computed from a config alone (no process group). The tests check them against what
:func:`llama_edu.training.distributed.local_memory` and ``CollectiveCounter`` measure on real runs."""

from __future__ import annotations

from ..config import LlamaConfig


def per_rank_memory(config: LlamaConfig, strategy: str, n: int, param_bytes: int = 4, grad_bytes: int = 4, optim_bytes: int = 8) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state each of ``n`` ranks holds.

    Defaults are float32 training with Adam (two float32 moments: 8 bytes per parameter);
    mixed precision with float32 master weights is ``param_bytes=2, grad_bytes=2, optim_bytes=12``
    (ZeRO paper's 16 bytes per parameter). Activations are not counted (they depend on the batch).

    * ddp: everything, on every rank;
    * fsdp: 1/n of everything (plus, not counted, one gathered layer at a time);
    * tp: the decoder layers' projections split n ways, embeddings, norms and LM head replicated;
    * fsdp+tp on ``n = dp x tp`` ranks: pass ``strategy="fsdp+tp:T"`` with the tp size T.
    """
    total = count_parameters(config)
    split = count_parameters(config, tp_split_only=True)  # what TP divides
    if strategy == "ddp":
        held = total
    elif strategy == "fsdp":
        held = total / n
    elif strategy == "tp":
        held = total - split + split / n
    elif strategy.startswith("fsdp+tp:"):
        tp = int(strategy.split(":")[1])
        held = (total - split + split / tp) / (n // tp)
    else:
        raise ValueError(f"strategy must be ddp, fsdp, tp or fsdp+tp:T, got {strategy!r}")
    return {"params": held * param_bytes, "grads": held * grad_bytes, "optim": held * optim_bytes,
            "total": held * (param_bytes + grad_bytes + optim_bytes)}


def count_parameters(config: LlamaConfig, tp_split_only: bool = False) -> int:
    """Parameters of a LlamaForCausalLM with ``config`` (a tied head counted once), computed
    from the shapes; with ``tp_split_only``, only the projections tensor parallelism splits."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    proj = h * h * 2 + h * kv * 2 + 3 * h * i  # q, o; k, v; gate, up, down
    if config.attention_bias:
        proj += 2 * h + 2 * kv
    if tp_split_only:
        return L * proj
    embed = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return L * (proj + 2 * h) + h + embed


def bytes_per_step(config: LlamaConfig, strategy: str, n: int, grad_bytes: int = 4, param_bytes: int = 4, tokens: int | None = None) -> dict[str, float]:
    """Bytes the collectives carry in one training step (no gradient accumulation) on each of
    ``n`` ranks, by kind (``all_reduce``, ``all_gather``, ``reduce_scatter``), plus two totals.

    "payload" is the size of the whole tensors the collectives combine (the gradient for an
    all-reduce, the gathered weights for an all-gather, the gradient going into a
    reduce-scatter): what :class:`CollectiveCounter` counts. "wire" is what a ring algorithm then
    sends from each rank: 2 (n-1)/n x payload for an all-reduce, (n-1)/n x payload for an
    all-gather or a reduce-scatter. ``param_bytes`` is also the activations' size for TP.

    * ddp: one all-reduce of all gradients;
    * fsdp: the weights all-gathered twice (in the forward, and again in the backward because
      each layer's are freed after its forward; the root's stay gathered in between), and one
      reduce-scatter of the gradients;
    * tp: two all-reduces of the (``tokens``, hidden) activations per layer in the forward
      (after o_proj, after down_proj) and two in the backward (their input gradients);
      ``tokens`` = rows x sequence length on a rank. Replicated weights' gradients are equal on
      every rank already, so they are not communicated;
    * ``fsdp+tp:T``: tp within groups of T ranks, FSDP of each tp rank's share over n / T.
    """
    total = count_parameters(config)
    f = (n - 1) / n
    if strategy == "ddp":
        payload = {"all_reduce": total * grad_bytes}
        wire = 2 * f * total * grad_bytes
    elif strategy == "fsdp":
        layers = total - _root_parameters(config)
        payload = {"all_gather": (2 * layers + _root_parameters(config)) * param_bytes, "reduce_scatter": total * grad_bytes}
        wire = f * (payload["all_gather"] + payload["reduce_scatter"])
    elif strategy == "tp":
        if tokens is None:
            raise ValueError("tensor parallelism communicates activations: pass tokens = batch rows x sequence length")
        act = tokens * config.hidden_size * param_bytes
        payload = {"all_reduce": 4 * config.num_hidden_layers * act}
        wire = 2 * f * payload["all_reduce"]
    elif strategy.startswith("fsdp+tp:"):
        if tokens is None:
            raise ValueError("tensor parallelism communicates activations: pass tokens = batch rows x sequence length")
        tp = int(strategy.split(":")[1])
        dp = n // tp
        split = count_parameters(config, tp_split_only=True)
        held = total - split + split / tp  # one tp rank's parameters, then sharded over dp
        root = _root_parameters(config)
        fsdp_ag = (2 * (held - root) + root) * param_bytes
        payload = {"all_gather": fsdp_ag, "reduce_scatter": held * grad_bytes,
                   "all_reduce": 4 * config.num_hidden_layers * tokens * config.hidden_size * param_bytes}
        wire = (dp - 1) / dp * (fsdp_ag + held * grad_bytes) + 2 * (tp - 1) / tp * payload["all_reduce"]
    else:
        raise ValueError(f"strategy must be ddp, fsdp, tp or fsdp+tp:T, got {strategy!r}")
    return {**payload, "payload": sum(payload.values()), "wire": wire}


def _root_parameters(config: LlamaConfig) -> int:
    """Parameters outside the decoder layers: embeddings, final norm, untied LM head."""
    return config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2) + config.hidden_size
