"""Data parallel, FSDP2 and tensor parallelism on 2 (and 4) CPU processes with the gloo backend:
each strategy must reproduce the single-process run (losses, weights, logits, generated tokens),
sharded checkpoints must resume on a different number of ranks, and the memory and traffic
accounting must match what the ranks hold and what the collectives carried.

Every spawned process is started the way torchrun starts it (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so the code under test is the one the ``train`` command runs.
The model is the project's trained Shakespeare Llama (GQA: 8 heads, 4 kv heads), trained
further on tiny Shakespeare tokens; the MHA case is a small random-weight config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time as time_module
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_edu import LlamaConfig, LlamaForCausalLM
from llama_edu import distributed as D
from llama_edu.course import costs
from llama_edu.files import DEFAULT_MODEL_DIR, find_data_file
from llama_edu.train import TrainConfig, TrainingInterrupted, make_optimizer, train

BATCH, BLOCK, STEPS, LR = 4, 32, 3, 3e-3
MHA = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=32)
# Adam divides by sqrt(v): where a gradient entry is ~0, a rounding difference from summing in
# another order changes that entry's step by up to ~lr. So: no weight further than 5% of the
# most a weight can move (lr * STEPS), and all but a handful within 1e-5.
WEIGHT_TOL = 0.05 * LR * STEPS
FEW = 1e-4  # the fraction of weights allowed to differ by more than 1e-5
LOGIT_TOL = 1e-4


# ----------------------------------------------------------------------------- helpers
def shakespeare_tokens() -> torch.Tensor:
    """The first 20,000 characters of tiny Shakespeare in the project's tokenizer."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(DEFAULT_MODEL_DIR.parent / "tokenizer.model"))
    text = find_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000]
    return torch.tensor(sp.encode(text), dtype=torch.long)


def batch(tokens: torch.Tensor, step: int) -> torch.Tensor:
    """The global batch of ``step``: BATCH windows of BLOCK + 1 tokens, the same in every process."""
    g = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(len(tokens) - BLOCK - 1, (BATCH,), generator=g)
    return torch.stack([tokens[s : s + BLOCK + 1] for s in starts.tolist()])


def train_steps(model, optimizer, tokens, par, first: int, steps: int, counter: D.CollectiveCounter | None = None) -> list[float]:
    """``steps`` AdamW steps on the global batches ``first ...``; returns the global losses
    and, after them, the gradient norms (before clipping) of each step."""
    losses, norms = [], []
    for step in range(first, first + steps):
        x = D.local_rows(batch(tokens, step), par)
        with counter if counter is not None and step == first else _nothing():
            logits = model(input_ids=x[:, :-1], use_cache=False).logits  # (rows, block, vocab)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        norms.append(D.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        losses.append(D.mean_over_ranks(loss.detach(), par))
    return losses + norms


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def shakespeare_model() -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)


def max_weight_diff(a: dict, b: dict) -> float:
    """The largest |difference| between two state dicts, after checking that only a few weights
    differ by more than 1e-5 (see WEIGHT_TOL)."""
    assert a.keys() == b.keys()
    diffs = [(a[k].float() - b[k].float()).abs() for k in a]
    beyond = sum(int((d > 1e-5).sum()) for d in diffs) / sum(d.numel() for d in diffs)
    assert beyond < FEW, f"{beyond:.1e} of the weights differ by more than 1e-5"
    return max(d.max().item() for d in diffs)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return shakespeare_tokens()


@pytest.fixture(scope="module")
def reference(tokens, tmp_path_factory):
    """One process, global batch BATCH: 2 * STEPS steps, a sharded checkpoint after STEPS."""
    out = tmp_path_factory.mktemp("ref")
    torch.manual_seed(0)
    model = shakespeare_model()
    opt = make_optimizer(model, LR, 0.1)
    first = train_steps(model, opt, tokens, None, 0, STEPS)
    mid = {k: v.clone() for k, v in model.state_dict().items()}
    D.save_sharded(model, opt, out / "dcp")  # no process group: a one-process DCP checkpoint
    second = train_steps(model, opt, tokens, None, STEPS, STEPS)
    return {"first": first, "second": second, "mid": mid, "end": model.state_dict(), "dcp": out / "dcp"}


def same_curve(got: list[float], expected: list[float]) -> bool:
    """Losses within 1e-5 nats and gradient norms within 1e-5 relative: the gradients, not
    only the Adam steps (which ignore a gradient's scale), are the one-process ones."""
    n = len(expected) // 2
    return got[:n] == pytest.approx(expected[:n], abs=1e-5) and got[n:] == pytest.approx(expected[n:], rel=1e-5)


# ----------------------------------------------------------------------------- data parallel
def _two_rank_worker(rank, world, tokens, ref_dcp, out):
    """One pair of processes runs every 2-rank check (starting processes is the expensive part)."""
    for strategy in ("ddp", "fsdp"):
        (out / strategy).mkdir(exist_ok=True)
        _data_parallel_worker(rank, world, strategy, tokens, ref_dcp, out / strategy)
    (out / "tp").mkdir(exist_ok=True)
    _tensor_parallel_worker(rank, world, tokens, out / "tp")


@pytest.fixture(scope="module")
def two_ranks(tokens, reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    D.spawn(_two_rank_worker, 2, tokens, reference["dcp"], out)
    return out


def _data_parallel_worker(rank, world, strategy, tokens, ref_dcp, out):
    par = D.init_parallel(strategy, shakespeare_model().config)
    model = D.parallelize(shakespeare_model(), par)
    opt = make_optimizer(model, LR, 0.1)
    counter = D.CollectiveCounter()
    losses = train_steps(model, opt, tokens, par, 0, STEPS, counter)
    memory = D.local_memory(model, opt)
    mid = D.full_state_dict(model)
    D.save_sharded(model, opt, out / "dcp")  # 2 ranks -> resumed by 1 process in the test
    D.save_consolidated(model, out / "hf", par)
    # 1 process -> 2 ranks: resume the reference's one-process checkpoint and go on.
    model2 = D.parallelize(LlamaForCausalLM(shakespeare_model().config), par)
    opt2 = make_optimizer(model2, LR, 0.1)
    D.load_sharded(model2, opt2, ref_dcp)
    resumed = train_steps(model2, opt2, tokens, par, STEPS, STEPS)
    end = D.full_state_dict(model2)
    if rank == 0:
        torch.save({"losses": losses, "mid": mid, "resumed": resumed, "end": end, "memory": memory,
                    "calls": counter.calls, "bytes": counter.bytes}, out / "result.pt")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_data_parallel_matches_one_process_and_reshards(strategy, tokens, reference, two_ranks):
    tmp_path = two_ranks / strategy
    res = torch.load(tmp_path / "result.pt")
    config = shakespeare_model().config
    # the same loss curve and the same weights as one process with the whole batch
    assert same_curve(res["losses"], reference["first"])
    diff = max_weight_diff(res["mid"], reference["mid"])
    print(f"{strategy}: max |weight difference| after {STEPS} steps = {diff:.2e}")
    assert diff < WEIGHT_TOL
    # resumed on 2 ranks from a 1-process checkpoint: continues as the uninterrupted run
    assert same_curve(res["resumed"], reference["second"])
    assert max_weight_diff(res["end"], reference["end"]) < WEIGHT_TOL
    # ... and 1 process from the 2-rank checkpoint
    model = LlamaForCausalLM(config)
    opt = make_optimizer(model, LR, 0.1)
    D.load_sharded(model, opt, tmp_path / "dcp")
    assert same_curve(train_steps(model, opt, tokens, None, STEPS, STEPS), reference["second"])
    assert max_weight_diff(model.state_dict(), reference["end"]) < WEIGHT_TOL
    # the consolidated checkpoint is an ordinary HF-layout folder
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert max_weight_diff(loaded.state_dict(), res["mid"]) == 0.0
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: skipped loading the consolidated checkpoint with it")
    else:
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
        ids = tokens[:16][None]
        assert torch.allclose(loaded(ids).logits, theirs(ids).logits, atol=1e-5)
    # memory each rank holds, as computed
    expected = costs.per_rank_memory(config, strategy, 2)
    for part in ("params", "grads", "optim"):
        assert res["memory"][part] == pytest.approx(expected[part], rel=0.01), part  # FSDP pads rows to even shards
    # the bytes the collectives carried in one forward + backward, as computed
    computed = costs.bytes_per_step(config, strategy, 2)
    kinds = {"ddp": ["all_reduce"], "fsdp": ["all_gather", "reduce_scatter"]}[strategy]
    assert sorted(res["bytes"]) == kinds
    for kind in kinds:
        print(f"{strategy} {kind}: counted {res['bytes'][kind]:,} bytes, computed {computed[kind]:,.0f}")
        assert res["bytes"][kind] == pytest.approx(computed[kind], rel=0.01)


# ----------------------------------------------------------------------------- tensor parallel
def _tensor_parallel_worker(rank, world, tokens, out):
    prompt = tokens[:12][None]
    results = {}
    # GQA, trained weights: logits, greedy tokens, and a few training steps
    par = D.init_parallel("tp", shakespeare_model().config)
    model = D.apply_tensor_parallel(shakespeare_model().eval(), par.mesh)
    results["gqa_logits"] = model(prompt).logits
    results["tokens"] = model.generate(prompt, max_new_tokens=20, do_sample=False, cache_implementation="dynamic")
    model.train()
    opt = make_optimizer(model, LR, 0.1)
    counter = D.CollectiveCounter()
    results["losses"] = train_steps(model, opt, tokens, par, 0, STEPS, counter)
    results["weights"] = D.full_state_dict(model)
    results["memory"], results["bytes"], results["calls"] = D.local_memory(model, opt), counter.bytes, counter.calls
    # MHA, random weights
    torch.manual_seed(0)
    mha = D.apply_tensor_parallel(LlamaForCausalLM(LlamaConfig(**MHA)).eval(), par.mesh)
    results["mha_logits"] = mha(torch.arange(1, 20)[None]).logits
    if rank == 0:
        torch.save(results, out / "result.pt")


def test_tensor_parallel_matches_one_process(tokens, reference, two_ranks):
    tmp_path = two_ranks / "tp"
    res = torch.load(tmp_path / "result.pt")
    prompt = tokens[:12][None]
    model = shakespeare_model().eval()
    gqa = (res["gqa_logits"] - model(prompt).logits).abs().max().item()
    torch.manual_seed(0)
    mha = (res["mha_logits"] - LlamaForCausalLM(LlamaConfig(**MHA)).eval()(torch.arange(1, 20)[None]).logits).abs().max().item()
    print(f"tp: max |logit difference| GQA {gqa:.2e}, MHA {mha:.2e}")
    assert gqa < LOGIT_TOL and mha < LOGIT_TOL
    expected = model.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(res["tokens"], expected)
    assert same_curve(res["losses"], reference["first"])
    diff = max_weight_diff(res["weights"], reference["mid"])
    print(f"tp: max |weight difference| after {STEPS} steps = {diff:.2e}")
    assert diff < WEIGHT_TOL
    config = model.config
    expected_mem = costs.per_rank_memory(config, "tp", 2)
    for part in ("params", "grads", "optim"):
        assert res["memory"][part] == expected_mem[part], part
    # two all-reduces of (rows, block, hidden) per layer forward, two backward
    computed = costs.bytes_per_step(config, "tp", 2, tokens=BATCH * BLOCK)
    assert res["calls"] == {"all_reduce": 4 * config.num_hidden_layers}
    assert res["bytes"]["all_reduce"] == computed["all_reduce"]


def _fsdp_tp_worker(rank, world, tokens, out):
    par = D.init_parallel("fsdp+tp", shakespeare_model().config)
    assert (par.dp_size, par.tp_size) == (2, 2)
    model = D.parallelize(shakespeare_model(), par)
    opt = make_optimizer(model, LR, 0.1)
    losses = train_steps(model, opt, tokens, par, 0, STEPS)
    weights = D.full_state_dict(model)
    if rank == 0:
        torch.save({"losses": losses, "weights": weights}, out / "result.pt")


def test_fsdp_plus_tp_on_a_2x2_mesh_matches_one_process(tokens, reference, tmp_path):
    D.spawn(_fsdp_tp_worker, 4, tokens, tmp_path)
    res = torch.load(tmp_path / "result.pt")
    assert same_curve(res["losses"], reference["first"])
    diff = max_weight_diff(res["weights"], reference["mid"])
    print(f"fsdp+tp (2 x 2): max |weight difference| after {STEPS} steps = {diff:.2e}")
    assert diff < WEIGHT_TOL


# ----------------------------------------------------------------------------- errors and sums
def test_parallel_outside_torchrun_is_a_clear_error(monkeypatch):
    for name in D.TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node N"):
        D.init_parallel("ddp", LlamaConfig(**MHA))
    with pytest.raises(ValueError, match="must be one of"):
        D.init_parallel("zero3", LlamaConfig(**MHA))


def test_shapes_that_do_not_divide_are_clear_errors():
    gqa = LlamaConfig(**{**MHA, "num_attention_heads": 4, "num_key_value_heads": 2})
    with pytest.raises(ValueError, match="num_key_value_heads = 2 are not both divisible by 4"):
        D.check_parallel_shape("tp", gqa, 4)
    assert D.check_parallel_shape("tp", gqa, 2) == 2
    with pytest.raises(ValueError, match="N = 2 has no such split"):
        D.check_parallel_shape("fsdp+tp", gqa, 2)
    assert D.check_parallel_shape("fsdp+tp", gqa, 8) == 2  # tp must divide the 2 kv heads
    with pytest.raises(ValueError, match="pretraining_tp"):
        D.check_parallel_shape("tp", LlamaConfig(**{**MHA, "pretraining_tp": 2}), 2)
    par = D.Parallel("ddp", 0, 3, torch.device("cpu"), None, 3, 0, 1)
    with pytest.raises(ValueError, match="--batch-size 4 is the global batch .* multiple of 3"):
        D.local_rows(torch.zeros(4, 8), par)
    par = D.Parallel("ddp", 1, 2, torch.device("cpu"), None, 2, 1, 1)
    assert torch.equal(D.local_rows(torch.arange(8).view(4, 2), par), torch.tensor([[4, 5], [6, 7]]))


def test_parameter_count_and_7b_memory():
    from llama_edu.config import PRESETS

    assert costs.count_parameters(shakespeare_model().config) == shakespeare_model().num_parameters()
    cfg = LlamaConfig(**PRESETS["llama2-7b"])
    assert costs.count_parameters(cfg) == 6_738_415_616  # Llama-2-7b-hf's parameter count
    ddp, fsdp = costs.per_rank_memory(cfg, "ddp", 8), costs.per_rank_memory(cfg, "fsdp", 8)
    assert ddp["total"] == 16 * 6_738_415_616 and fsdp["total"] == ddp["total"] / 8


# ----------------------------------------------------------------------------- the train command
TINY = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True)


def run_config(data, out, parallel=None) -> TrainConfig:
    model = {**TrainConfig.__dataclass_fields__["model"].default_factory(), **TINY}  # as the command line builds it
    return TrainConfig(data=str(data), out_dir=str(out), model=model, steps=6, batch_size=4, block_size=32, lr=3e-3,
                       warmup_steps=2, eval_interval=3, eval_batches=2, log_interval=1, threads=1, progress=False,
                       parallel=parallel)


def interrupt_at(stop_step: int):
    """An on_step callback that presses Ctrl-C after ``stop_step``: train() then saves OUT/last/
    and raises TrainingInterrupted, on every rank at the same step."""
    def on_step(step, history, model):
        if step == stop_step:
            os.kill(os.getpid(), signal.SIGINT)
    return on_step


def _train_worker(rank, world, data, out):
    """2 FSDP ranks train out/a and are interrupted after step 3; then 2 TP ranks resume out/b,
    which one process left at step 3."""
    try:
        train(run_config(data, out / "a", "fsdp"), log=lambda s: None, on_step=interrupt_at(3))
    except TrainingInterrupted:
        pass
    else:
        raise AssertionError("the interrupted run did not stop")
    train(run_config(data, out / "b", "tp"), log=lambda s: None, resume=True)


@pytest.fixture(scope="module")
def train_runs(shakespeare_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_runs")
    with pytest.raises(TrainingInterrupted):
        train(run_config(shakespeare_slice, out / "b"), log=lambda s: None, on_step=interrupt_at(3))
    assert (out / "b" / "last" / "optimizer.pt").is_file()  # a one-process checkpoint: no dcp/
    D.spawn(_train_worker, 2, shakespeare_slice, out)
    return out


@pytest.fixture(scope="module")
def shakespeare_slice(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "slice.txt"
    path.write_text(find_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_process_run(shakespeare_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    history = train(run_config(shakespeare_slice, out), log=lambda s: None)
    return history, out


def test_train_interrupted_on_2_fsdp_ranks_resumes_in_1_process(shakespeare_slice, one_process_run, train_runs):
    ref, ref_out = one_process_run
    tmp_path = train_runs / "a"
    assert sorted(os.listdir(tmp_path / "last")) == ["config.json", "dcp", "model.safetensors", "rng.pt", "train_state.json"]
    state = json.loads((tmp_path / "last" / "train_state.json").read_text())
    assert state["step"] == 3
    assert [l for _, l in state["history"]["train"]] == pytest.approx([l for _, l in ref["train"][:3]], abs=1e-5)
    history = train(run_config(shakespeare_slice, tmp_path), log=lambda s: None, resume=True)  # one process, from dcp/
    assert [s for s, _ in history["train"]] == [1, 2, 3, 4, 5, 6]
    assert [l for _, l in history["train"]] == pytest.approx([l for _, l in ref["train"]], abs=1e-5)
    assert [v[1] for v in history["val"]] == pytest.approx([v[1] for v in ref["val"]], abs=1e-5)
    got = LlamaForCausalLM.from_pretrained(tmp_path / "last").state_dict()
    diff = max_weight_diff(got, LlamaForCausalLM.from_pretrained(ref_out / "last").state_dict())
    print(f"train: fsdp x2 for 3 steps, resumed in 1 process for 3 more: max |weight difference| {diff:.2e}")
    assert diff < 0.05 * 3e-3 * 6


def test_train_interrupted_in_1_process_resumes_on_2_tp_ranks(shakespeare_slice, one_process_run, train_runs):
    ref, ref_out = one_process_run
    tmp_path = train_runs / "b"
    state = json.loads((tmp_path / "last" / "train_state.json").read_text())
    assert state["step"] == 6
    assert [l for _, l in state["history"]["train"]] == pytest.approx([l for _, l in ref["train"]], abs=1e-5)
    got = LlamaForCausalLM.from_pretrained(tmp_path / "last").state_dict()
    diff = max_weight_diff(got, LlamaForCausalLM.from_pretrained(ref_out / "last").state_dict())
    print(f"train: 3 steps in 1 process, resumed as tp x2 for 3 more: max |weight difference| {diff:.2e}")
    assert diff < 0.05 * 3e-3 * 6


def _ddp_shutdown_worker(rank, world, data, out):
    """A DDP run that saves a DCP checkpoint, then shutdown(): the names of the threads left."""
    train(run_config(data, out / "run", "ddp"), log=lambda s: None)
    D.shutdown()
    tasks = Path("/proc/self/task")
    names = sorted((t / "comm").read_text().strip() for t in tasks.iterdir()) if tasks.is_dir() else []
    (out / f"threads{rank}.json").write_text(json.dumps(names))


def test_no_gloo_thread_outlives_a_ddp_run(shakespeare_slice, tmp_path):
    """shutdown() ends gloo's worker threads: one still alive while Python finalizes aborts the
    rank when it drops a tensor ("terminate called without an active exception", SIGABRT after a
    run that succeeded). torch.distributed.checkpoint imported after the group exists would keep
    the group alive (torch.distributed.nn binds group.WORLD as a default argument)."""
    D.spawn(_ddp_shutdown_worker, 2, shakespeare_slice, tmp_path)
    for rank in (0, 1):
        names = json.loads((tmp_path / f"threads{rank}.json").read_text())
        if not names:
            pytest.skip("this system does not list a process's threads in /proc")
        assert not [n for n in names if "gloo" in n], f"rank {rank} still has the threads {names} after shutdown()"


def test_torchrun_train_command_with_ddp(shakespeare_slice, one_process_run, tmp_path):
    """The command a learner types; rank 0 alone prints; the run equals the one-process run."""
    ref, _ = one_process_run
    c = run_config(shakespeare_slice, tmp_path / "run")
    args = ["--data", c.data, "--out", c.out_dir, "--steps", "6", "--batch-size", "4", "--block-size", "32", "--lr", "3e-3",
            "--warmup-steps", "2", "--eval-interval", "3", "--eval-batches", "2", "--log-interval", "1", "--threads", "1",
            "--hidden-size", "32", "--intermediate-size", "96", "--num-hidden-layers", "2", "--num-attention-heads", "4",
            "--num-key-value-heads", "2", "--parallel", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llama_edu", "train", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step     1 | loss") == 1  # rank 0 only
    assert "--parallel ddp on 2 ranks" in proc.stdout
    assert proc.stdout.count("best val") == 1  # printed last, flushed before the rank's os._exit
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [l for _, l in history["train"]] == pytest.approx([l for _, l in ref["train"]], abs=1e-5)


def _budget_worker(rank, world, data, out):
    """2 DDP ranks with --max-minutes 1 whose clocks disagree: rank 1's jumps an hour ahead after
    step 1, so only rank 1 sees the budget spent at step 2 (as a slow rank, or one that started
    late, would). Each rank writes the steps it ran."""
    import types

    from llama_edu.training import loop

    clock = types.SimpleNamespace(offset=0.0)
    loop.time = types.SimpleNamespace(time=lambda: time_module.time() + clock.offset)

    def on_step(step, history, model):
        if rank == 1 and step == 1:
            clock.offset = 3600.0

    c = run_config(data, out, "ddp")
    c.max_minutes = 1
    history = train(c, log=lambda s: None, on_step=on_step)
    (out / f"rank{rank}.json").write_text(json.dumps({"steps": history["steps"]}))


def run_budget_ranks(data, out):
    D.spawn(_budget_worker, 2, data, out)


def test_time_budget_stops_every_rank_at_the_same_step(shakespeare_slice, tmp_path):
    """A rank that alone sees the time budget spent must not stop alone: the others would wait for
    it in the next collective forever. Run in a child process, killed (with its ranks) if it hangs."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_distributed as T; "
            f"from pathlib import Path; T.run_budget_ranks(Path({str(shakespeare_slice)!r}), Path({str(tmp_path / 'run')!r}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the ranks hung: one stopped on its own clock while the other waited in a collective")
    assert proc.returncode == 0, output[-3000:]
    steps = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text())["steps"] for r in (0, 1)]
    assert steps == [2, 2]
    state = json.loads((tmp_path / "run" / "last" / "train_state.json").read_text())
    assert state["step"] == 2


def test_parallel_without_torchrun_and_batch_that_does_not_split(shakespeare_slice, tmp_path, monkeypatch, capsys):
    from llama_edu.cli import main

    for name in D.TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--data", str(shakespeare_slice), "--out", str(tmp_path / "x"), "--parallel", "fsdp", "--steps", "1"]) == 1
    assert "torchrun --nproc_per_node N -m llama_edu train ... --parallel fsdp" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written
