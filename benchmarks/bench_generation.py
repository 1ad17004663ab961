"""Generation speed and memory: llama_edu against transformers, same weights, same run.

    python benchmarks/bench_generation.py                    # CPU, float32, the default cases
    python benchmarks/bench_generation.py --quick            # fewer repeats and tokens
    python benchmarks/bench_generation.py --compile          # also generate(compile=True)
    python benchmarks/bench_generation.py --device cuda --dtype bfloat16 --shape 7b --layers 4

Cases (random weights: speed does not depend on what the weights say):
  decode   tokens/s generating --new-tokens tokens greedily after an 8-token prompt, batch 1
           (and batch 8 for "decode b8"), the KV cache on; both libraries stop only at the length
  prefill  tokens/s for a 512-token prompt (the forward pass generate runs before decoding)
  memory   peak memory while generating, in a fresh subprocess per library: the growth of the
           resident set (RSS high-water mark minus RSS before generating) on CPU,
           torch.cuda.max_memory_allocated on CUDA

  aten ops the number of PyTorch operators dispatched per decoded token (a TorchDispatchMode
           counter: generate 21 tokens minus generate 11, divided by 10), greedy, batch 1. On a
           small model each operator costs about the same (dispatch, not arithmetic), so this is
           the deterministic measure of per-token overhead, on CPU and GPU alike.
  compile  with --compile: generate(compile=True) tokens/s, and the seconds its first call took
           (compiling the decode step)
  bandwidth on CUDA: weight bytes read per decoded token x tok/s / the GPU's peak memory
           bandwidth (--peak-gbps, else a table of known GPUs): how close decoding gets to the
           memory-bound limit (gpt-fast reports about 82% on an A100)

Each number is the median of --repeats runs after a warm-up, with ours and theirs interleaved
so that other load on the machine hits both alike. Ratios > 1 mean llama_edu is faster/smaller.

    python benchmarks/bench_generation.py --targets          # the speed targets table (CPU)
    python benchmarks/bench_generation.py --targets --device cuda --shape 7b

--targets: batch 1, greedy decoding of --new-tokens tokens after an 8-token prompt, at 1 and 2
threads (--target-threads), on the shipped Shakespeare model (data/shakespeare-llama) and the
stories15M shape (random weights, dim 288, 6 layers, 6 heads, vocab 32000, untied LM head): tok/s
of transformers, llama_edu eager and compile=True in float32, int8 and int4 (weight-only, the
packed PyTorch kernels with bfloat16 activations: quantize.set_compute_dtype; the LM head quantized
too where it is untied), and llama.cpp F32 and Q8_0 through llama-cpp-python in the same run
(skipped when it is not installed). The GGUF files are written by a minimal writer inside this
script (gguf's GGUFWriter, Q/K permuted back to Meta's interleaved rotary layout). Each row also
says how much of the memory bandwidth it uses: weight bytes read per token x tok/s against the
bandwidth of a large tensor copy measured in the same run (small models live in the CPU caches,
so their fraction can pass 100%). Then eager against transformers on the real stories260K, and
the targets, each marked met or not. ``--targets --shape 42m``: the same on a stories42M shape (dim
512, 8 layers, vocab 32000, random weights), held out: none of the speed work was tuned on it. On CUDA (--device cuda --shape 7b): a 7B-shaped model in
bfloat16, eager and compiled (CUDA graphs), int8 and int4, tok/s and the fraction of the GPU's
peak HBM bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    # name: (preset, overrides)
    "tiny": ("stories260k", dict(max_position_embeddings=1024)),
    "15m": ("stories15m", dict(max_position_embeddings=1024)),
    "7b": ("llama2-7b", dict()),
    # held out for --targets: a stories42M-like shape none of the speed work was tuned on
    "42m": ("stories15m", dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                               num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False)),
    # the project's shipped model (data/shakespeare-llama): its shape, random weights, a longer context
    "shipped": (Path(__file__).resolve().parent.parent / "data" / "shakespeare-llama", dict(max_position_embeddings=1024)),
}


def make_config(shape: str, layers: int | None):
    """The LlamaConfig of a named shape (a preset, or a model folder's config.json)."""
    from llama_edu import LlamaConfig

    preset, overrides = SHAPES[shape]
    if layers:
        overrides = {**overrides, "num_hidden_layers": layers}
    if isinstance(preset, Path):
        return LlamaConfig.from_pretrained(preset, **overrides)
    return LlamaConfig.from_preset(preset, **overrides)


def build_pair(shape: str, device: str, dtype: torch.dtype, layers: int | None):
    """transformers' LlamaForCausalLM and ours with identical random weights, in eval mode."""
    import transformers

    from llama_edu import LlamaForCausalLM

    cfg = make_config(shape, layers)
    hf_kwargs = {k: v for k, v in cfg.to_dict().items() if k != "attn_implementation"}
    hf_cfg = transformers.LlamaConfig(**hf_kwargs)
    hf_cfg._attn_implementation = "sdpa"  # the fastest transformers 4.37 offers; ours uses sdpa too
    torch.manual_seed(0)
    with torch.device(device):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the target dtype: no float32 copy of a big model
        try:
            theirs = transformers.LlamaForCausalLM(hf_cfg).eval()
            ours = LlamaForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(old)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_generate(model, ids: torch.Tensor, new_tokens: int, device: str, **kw) -> float:
    """Seconds for one greedy generate of exactly ``new_tokens`` tokens."""
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    sync(device)
    elapsed = time.perf_counter() - t
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    return elapsed


def same_tokens(model, ids: torch.Tensor, new_tokens: int, kw: dict) -> float:
    """The fraction of ``new_tokens`` greedy tokens that ``generate(**kw)`` shares with plain
    ``generate``: a speed measured on wrong tokens would mean nothing (1.0, or close to it where
    fused kernels round differently and a near-tie flips)."""
    with torch.inference_mode():
        a, b = (model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **k)
                for k in (kw, {}))
    n = min(a.shape[1], b.shape[1])  # an eos may end one of them early
    return (a[:, ids.shape[1]:n] == b[:, ids.shape[1]:n]).float().mean().item() if n > ids.shape[1] else 0.0


def time_case(variants: dict, ids, new_tokens, repeats, device) -> dict:
    """Median tokens/s of each variant {name: (model, generate kwargs)}: one warm-up each (it
    also compiles, for compile=True), then ``repeats`` rounds running the variants in turn."""
    for model, kw in variants.values():
        run_generate(model, ids, new_tokens, device, **kw)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (model, kw) in variants.items():
            times[name].append(run_generate(model, ids, new_tokens, device, **kw))
    tokens = ids.shape[0] * (ids.shape[1] if new_tokens == 1 else new_tokens)
    return {name: tokens / statistics.median(t) for name, t in times.items()}


class OpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_token(model, ids: torch.Tensor, device: str) -> float:
    """aten ops per decoded token: generate 21 tokens minus generate 11, over 10."""
    counts = []
    for n in (11, 21):
        with OpCounter() as counter:
            run_generate(model, ids, n, device)
        counts.append(counter.count)
    return (counts[1] - counts[0]) / 10


#: Peak memory bandwidth in GB/s of GPUs, by a substring of torch.cuda.get_device_name().
PEAK_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
             "A100-SXM4-40GB": 1555, "A100": 1555, "L4": 300, "T4": 320, "A10G": 600, "4090": 1008}


def peak_gbps(override: float | None) -> float | None:
    if override:
        return override
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def memory_child(which: str, shape: str, batch: int, new_tokens: int, device: str, dtype: str, layers: int | None) -> None:
    """Run in a fresh process: print the peak memory growth of one generate as JSON.

    Only the measured library's model is built (weights are random either way). On CPU the
    resident-set high-water mark (VmHWM) is reset through /proc/self/clear_refs just before
    generating, so the peak is that of generation alone, not of imports or model building.
    """
    import transformers

    from llama_edu import LlamaForCausalLM

    warnings.filterwarnings("ignore")
    cfg = make_config(shape, layers)
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))
    with torch.device(device):
        if which == "ours":
            model = LlamaForCausalLM(cfg).eval()
        else:
            hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k != "attn_implementation"})
            hf_cfg._attn_implementation = "sdpa"
            model = transformers.LlamaForCausalLM(hf_cfg).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(3, cfg.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(0)).to(device)
    run_generate(model, ids, 4, device)  # warm-up: one-time allocations are not generation's cost
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_generate(model, ids, new_tokens, device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status_kib("VmRSS") * 1024
        run_generate(model, ids, new_tokens, device)
        peak = _status_kib("VmHWM") * 1024 - base
    print(json.dumps({"peak": peak}))


def measure_memory(which: str, args, shape: str, batch: int) -> float:
    cmd = [sys.executable, __file__, "--memory-child", which, "--shape", shape, "--batch", str(batch),
           "--new-tokens", str(args.new_tokens), "--device", args.device, "--dtype", args.dtype,
           "--threads", str(args.threads)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"] / 2**20


# ---------------------------------------------------------------------------------------------
# --targets: the speed table against llama.cpp
# ---------------------------------------------------------------------------------------------
def copy_bandwidth(device: str, mib: int = 256) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written), the best of 5: the memory
    bandwidth ceiling that decoding, which reads every weight once per token, runs against."""
    a = torch.ones(mib * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def last_level_cache_bytes() -> int | None:
    """The size of the CPU's largest cache level (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, size = int((entry / "level").read_text()), (entry / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        sizes.append((level, int(size.rstrip("KMG")) * unit))
    return max(sizes)[1] if sizes else None


def bytes_read_per_token(model) -> int:
    """Bytes of weights one decoded token reads: every tensor of the state dict once (a tied
    tensor once), except the input embedding table, of which one row is read, unless it is
    also the LM head (tied), which reads all of it."""
    emb = model.model.embed_tokens.weight
    head = getattr(model.lm_head, "weight", None)
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        n = t.numel() * t.element_size()
        if t.data_ptr() == emb.data_ptr() and (head is None or head.data_ptr() != emb.data_ptr()):
            n = t.shape[1] * t.element_size()
        total += n
    return total


# --- a minimal GGUF writer, for this benchmark only (the package's exporter lives in llama_edu/io/gguf.py)
def write_gguf(model, path: Path, qtype: str) -> int:
    """Write ``model`` (a llama_edu LlamaForCausalLM, float32) as a llama.cpp GGUF file with
    matrices in ``qtype`` ("F32" or "Q8_0"; a matrix whose rows are not a multiple of Q8_0's
    blocks of 32 is stored in F16, as llama.cpp's converter falls back) and a placeholder vocabulary
    (speed does not depend on the tokens' text; we feed ids). Returns the bytes of weights one
    token reads, counted as :func:`bytes_read_per_token` counts them."""
    import gguf
    import numpy as np

    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in sd

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
        # transformers' rotate_half layout -> Meta's interleaved pairs, which llama.cpp expects
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not tied:
        tensors["output.weight"] = sd["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in names.items():
            w = sd[f"model.layers.{i}.{ours}.weight"]
            if ours == "self_attn.q_proj":
                w = permute(w, cfg.num_attention_heads)
            elif ours == "self_attn.k_proj":
                w = permute(w, cfg.num_key_value_heads)
            tensors[f"blk.{i}.{theirs}.weight"] = w

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "Q8_0" else gguf.LlamaFileType.ALL_F32)
    # placeholder SentencePiece-style vocabulary: <unk> <s> </s>, the 256 byte tokens, then fillers
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    tokens += [f"tok{i}" for i in range(len(tokens), cfg.vocab_size)]
    types += [1] * (cfg.vocab_size - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens[: cfg.vocab_size])
    writer.add_token_scores([0.0] * cfg.vocab_size)
    writer.add_token_types(types[: cfg.vocab_size])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    read = 0
    for name, w in tensors.items():
        arr = w.numpy().astype(np.float32)
        if w.dim() == 2 and qtype == "Q8_0":
            kind = gguf.GGMLQuantizationType.Q8_0 if w.shape[1] % 32 == 0 else gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(arr, kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
        else:
            data = arr
            writer.add_tensor(name, data)
        n = data.nbytes
        if name == "token_embd.weight" and not tied:
            n //= w.shape[0]  # one row read per token
        read += n
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read


def llama_cpp_decoder(path: Path, threads: int, n_ctx: int):
    """A function n -> seconds to greedily decode n tokens after an 8-token prompt with
    llama-cpp-python (the prompt's evaluation included, as in generate)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=64,
                verbose=False, logits_all=False)
    prompt = list(range(3, 11))

    def next_token() -> int:  # argmax of the last position's logits, read in place
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    def decode(n: int) -> float:
        t = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        for _ in range(n - 1):
            llm.eval([next_token()])
        next_token()
        return time.perf_counter() - t

    return decode


def target_models(device: str, dtype: torch.dtype, shape: str | None):
    """(label, our model, transformers' model or None) for the targets table."""
    import transformers

    from llama_edu import LlamaConfig, LlamaForCausalLM

    def hf_twin(ours):
        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in ours.config.to_dict().items() if k != "attn_implementation"})
        hf_cfg._attn_implementation = "sdpa"
        with torch.device(device):
            theirs = transformers.LlamaForCausalLM(hf_cfg).eval().to(dtype)
        theirs.load_state_dict(ours.state_dict(), strict=False)
        if hf_cfg.tie_word_embeddings:
            theirs.tie_weights()
        return theirs

    if device.startswith("cuda"):
        cfg = LlamaConfig.from_preset("llama2-7b")
        torch.manual_seed(0)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                ours = LlamaForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(old)
        return [("llama2-7b shape (random)", ours, None)]
    models = []
    if shape in (None, "shakespeare"):
        ours = LlamaForCausalLM.from_pretrained(Path(__file__).resolve().parent.parent / "data" / "shakespeare-llama").eval()
        models.append(("shakespeare-llama", ours, hf_twin(ours)))
    if shape in (None, "15m"):
        cfg = LlamaConfig.from_preset("stories15m", max_position_embeddings=1024, tie_word_embeddings=False)
        torch.manual_seed(0)
        ours = LlamaForCausalLM(cfg).eval()
        models.append(("stories15M shape (random)", ours, hf_twin(ours)))
    if shape == "42m":  # held out: nothing in the speed work was tuned on this shape
        cfg = make_config("42m", None)
        torch.manual_seed(0)
        ours = LlamaForCausalLM(cfg).eval()
        models.append(("stories42M shape (random, held out)", ours, hf_twin(ours)))
    return models


def quantized_copy(model, scheme: str, device: str):
    """A quantized deep copy: int8, or int4 in groups of 32 (one group per row where 32 does not
    divide every layer); the LM head too when it is untied; packed kernels in bfloat16."""
    import copy

    from llama_edu import quantize as Q

    m = copy.deepcopy(model)
    head = not m.config.tie_word_embeddings
    if scheme == "int8":
        Q.quantize(m, "int8", include_lm_head=head)
    else:
        fits = all(lin.in_features % 32 == 0 for _, lin in Q.linear_layers_to_quantize(m, head))
        Q.quantize(m, "int4", group_size=32 if fits else -1, include_lm_head=head)
    return Q.set_compute_dtype(m, torch.bfloat16).to(device)


def run_targets(args) -> None:
    import tempfile

    from llama_edu import LlamaForCausalLM

    device = args.device
    dtype = getattr(torch, args.dtype)
    cuda = device.startswith("cuda")
    try:
        import llama_cpp  # noqa: F401
        have_llama_cpp = not cuda
    except ImportError:
        have_llama_cpp = False
    threads_list = [1] if cuda else args.target_threads
    prompt = torch.arange(3, 11)[None].to(device)
    n = args.new_tokens
    results = {}  # (model label, threads) -> {variant: (tok/s, bytes per token)}
    tmp = Path(tempfile.mkdtemp(prefix="bench_gguf_"))
    for label, ours, theirs in target_models(device, dtype, None if args.shape in (None, "all", "7b") else args.shape):
        int8, int4 = quantized_copy(ours, "int8", device), quantized_copy(ours, "int4", device)
        ours_variants = {"eager": (ours, {}), "compiled": (ours, {"compile": True}),
                         "int8 eager": (int8, {}), "int8 compiled": (int8, {"compile": True}),
                         "int4 eager": (int4, {}), "int4 compiled": (int4, {"compile": True})}
        bytes_of = {"eager": bytes_read_per_token(ours), "int8": bytes_read_per_token(int8), "int4": bytes_read_per_token(int4)}
        ggufs = {}
        if have_llama_cpp:
            for q in ("F32", "Q8_0"):
                path = tmp / f"{label.split()[0]}-{q}.gguf"
                ggufs[q] = (path, write_gguf(ours, path, q))
        for threads in threads_list:
            torch.set_num_threads(threads)
            decoders = {}
            if theirs is not None:
                decoders["transformers"] = lambda k, m=theirs: run_generate(m, prompt, k, device)
            for name, (model, kw) in ours_variants.items():
                decoders[name] = lambda k, m=model, kw=kw: run_generate(m, prompt, k, device, **kw)
            for q, (path, _) in ggufs.items():
                decoders[f"llama.cpp {q}"] = llama_cpp_decoder(path, threads, n_ctx=prompt.shape[1] + n + 8)
            for name, decode in decoders.items():  # warm-up (and compile)
                t0 = time.perf_counter()
                decode(n)
                if "compiled" in name:
                    print(f"  {label}, {threads} thread(s): {name} first call (compiling) {time.perf_counter() - t0:.1f} s", flush=True)
                    model, kw = ours_variants[name]
                    print(f"    its tokens equal the eager path's: {same_tokens(model, prompt, n, kw):.0%}", flush=True)
            times = {name: [] for name in decoders}
            for _ in range(args.repeats):
                for name, decode in decoders.items():
                    times[name].append(decode(n))
            row = {}
            for name, ts in times.items():
                key = name.split()[0] if name.split()[0] in ("int8", "int4") else "eager"
                b = ggufs[name.split()[1]][1] if name.startswith("llama.cpp") else bytes_of[key]
                row[name] = (n / statistics.median(ts), b)
            results[(label, threads)] = row
            print(f"  {label}, {threads} thread(s): " + ", ".join(f"{k} {v[0]:.0f}" for k, v in row.items()), flush=True)
        del int8, int4
    bandwidth = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        bandwidth[threads] = copy_bandwidth(device)
    if cuda:
        peak = peak_gbps(args.peak_gbps)
        bandwidth = {1: peak} if peak else bandwidth

    print()
    print(f"torch {torch.__version__}, device {device}, batch 1, greedy, {n} new tokens after 8, median of {args.repeats}")
    for threads in threads_list:
        what = "peak HBM bandwidth" if cuda and peak_gbps(args.peak_gbps) else "copy bandwidth (read + write)"
        print(f"{what} at {threads} thread(s): {bandwidth[threads]:.1f} GB/s")
    cache = None if cuda else last_level_cache_bytes()
    if cache:
        # Weights smaller than this can stay in the cache between tokens: their rows may read over
        # 100% of the copy bandwidth, and int8 then has little memory traffic to save.
        print(f"last-level CPU cache: {cache / 2**20:.0f} MiB")
    print()
    print("| model | threads | variant | tok/s | MB read / token | % of bandwidth |")
    print("|---|---:|---|---:|---:|---:|")
    for (label, threads), row in results.items():
        for name, (tps, b) in row.items():
            print(f"| {label} | {threads} | {name} | {tps:.0f} | {b / 1e6:.2f} | {100 * b * tps / (bandwidth[threads] * 1e9):.0f}% |")

    if cuda:
        print("\n(7B on CUDA: numbers from this run; llama.cpp is not compared on CUDA here.)")
        return
    # eager against transformers on the real stories260K
    print()
    data = None
    for base in (Path(__file__).resolve().parent.parent.parent / "shared" / "data", Path("/work/shared/data")):
        if (base / "stories260K" / "hf" / "config.json").exists():
            data = base / "stories260K" / "hf"
            break
    s260 = {}
    if data is None:
        print("stories260K not found (../shared/data/stories260K/hf): skipped its row")
    else:
        import transformers

        ours = LlamaForCausalLM.from_pretrained(data).eval()
        theirs = transformers.LlamaForCausalLM.from_pretrained(data, attn_implementation="sdpa").eval()
        ids = torch.tensor([[1]])
        for threads in threads_list:
            torch.set_num_threads(threads)
            speed = time_case({"ours": (ours, {}), "theirs": (theirs, {})}, ids, min(n, 200), args.repeats, device)
            s260[threads] = speed
            print(f"stories260K (real weights), {threads} thread(s): eager {speed['ours']:.0f} tok/s, "
                  f"transformers {speed['theirs']:.0f} tok/s, {speed['ours'] / speed['theirs']:.2f}x")

    print()
    print("| target | model | threads | measured | met |")
    print("|---|---|---:|---|---|")
    for (label, threads), row in results.items():
        tps = {k: v[0] for k, v in row.items()}
        checks = [("compile=True >= llama.cpp F32", "compiled", "llama.cpp F32", 1.0),
                  ("int8 compiled >= llama.cpp Q8_0", "int8 compiled", "llama.cpp Q8_0", 1.0),
                  ("int8 eager >= 1.2x fp32 eager", "int8 eager", "eager", 1.2),
                  ("compiled faster than eager", "compiled", "eager", 1.0)]
        for target, a, b, factor in checks:
            if a in tps and b in tps:
                ratio = tps[a] / tps[b]
                print(f"| {target} | {label} | {threads} | {tps[a]:.0f} vs {tps[b]:.0f} = {ratio:.2f}x | "
                      f"{'yes' if ratio >= factor else 'NO'} |")
            else:
                print(f"| {target} | {label} | {threads} | skipped ({b if b not in tps else a} not measured) | - |")
    for threads, speed in s260.items():
        ratio = speed["ours"] / speed["theirs"]
        print(f"| eager >= 2x transformers | stories260K | {threads} | {speed['ours']:.0f} vs {speed['theirs']:.0f} = "
              f"{ratio:.2f}x | {'yes' if ratio >= 2 else 'NO'} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--shape", default=None, choices=[*SHAPES, "all", "shakespeare"],
                   help="default: tiny and 15m on CPU, 7b on CUDA (--targets: shakespeare and 15m on CPU)")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (e.g. 4 for a 7B-shaped slice)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="batch size of the batched-decode case")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--compile", action="store_true", help="also time generate(compile=True) (compiles first: slow warm-up)")
    p.add_argument("--quick", action="store_true", help="3 repeats, 64 new tokens")
    p.add_argument("--peak-gbps", type=float, default=None, help="the GPU's peak memory bandwidth in GB/s")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--targets", action="store_true", help="the speed-targets table (see the docstring)")
    p.add_argument("--target-threads", type=int, nargs="+", default=[1, 2], help="thread counts of --targets")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.targets:
        if args.quick:
            args.repeats, args.new_tokens = 3, 64
        elif "--new-tokens" not in (argv if argv is not None else sys.argv):
            args.new_tokens = 128  # the Shakespeare model's context is 256
        run_targets(args)
        return
    if args.shape == "shakespeare":
        p.error("--shape shakespeare is for --targets (the other cases use random weights)")
    if args.memory_child:
        memory_child(args.memory_child, args.shape, args.batch, args.new_tokens, args.device, args.dtype, args.layers)
        return
    if args.quick:
        args.repeats, args.new_tokens = 3, 64
    if args.shape in (None, "all"):
        shapes = ["tiny", "15m"] if args.device == "cpu" else ["7b"]
        if args.shape == "all":
            shapes = list(SHAPES)
    else:
        shapes = [args.shape]
    if args.shape == "7b" and args.layers is None and args.device == "cpu":
        args.layers = 2  # a full 7B in float32 needs 28 GB: time a 2-layer slice instead
    dtype = getattr(torch, args.dtype)

    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"dtype {args.dtype}, threads {args.threads}, median of {args.repeats}")
    rows = []
    for shape in shapes:
        theirs, ours = build_pair(shape, args.device, dtype, args.layers)
        vocab = ours.config.vocab_size
        g = torch.Generator().manual_seed(0)
        label = shape + (f" ({args.layers} layers)" if args.layers and shape == "7b" else "")
        ids1 = torch.randint(3, vocab, (1, 8), generator=g).to(args.device)
        idsb = torch.randint(3, vocab, (args.batch, 8), generator=g).to(args.device)
        idsp = torch.randint(3, vocab, (1, args.prefill_tokens), generator=g).to(args.device)
        cases = [
            (f"decode b1, {args.new_tokens} tok", ids1, args.new_tokens, "tok/s"),
            (f"decode b{args.batch}, {args.new_tokens} tok", idsb, args.new_tokens, "tok/s"),
            (f"prefill {args.prefill_tokens} tok", idsp, 1, "tok/s"),
        ]
        o_ops, t_ops = ops_per_token(ours, ids1, args.device), ops_per_token(theirs, ids1, args.device)
        rows.append((label, "aten ops per decoded token, b1", o_ops, t_ops, "ops"))
        print(f"  {label:>6} aten ops per token      ours {o_ops:10.1f}  transformers {t_ops:10.1f}", flush=True)
        for name, ids, n, unit in cases:
            variants = {"ours": (ours, {}), "theirs": (theirs, {})}
            if args.compile and n > 1:
                variants["ours compiled"] = (ours, {"compile": True})
                t0 = time.perf_counter()
                run_generate(ours, ids, n, args.device, compile=True)
                first = time.perf_counter() - t0
                print(f"  {label:>6} {name:<24} compile=True: first call (compiling) {first:.1f} s", flush=True)
                rows.append((label, f"{name}: first compile=True call", first, float("nan"), "s"))
            speed = time_case(variants, ids, n, args.repeats, args.device)
            t = speed["theirs"]
            for variant in [v for v in variants if v != "theirs"]:
                o = speed[variant]
                label_v = label + (" (compile=True)" if variant == "ours compiled" else "")
                rows.append((label_v, name, o, t, unit))
                print(f"  {label_v:>6} {name:<24} ours {o:10.1f}  transformers {t:10.1f}  ratio {o / t:5.2f}x", flush=True)
                gbps = peak_gbps(args.peak_gbps) if args.device.startswith("cuda") and n > 1 else None
                if gbps:  # every decoded token reads every weight once (batch rows share the read)
                    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
                    for who, tps in (("ours", o), ("transformers", t)):
                        frac = weight_bytes * tps / ids.shape[0] / (gbps * 1e9)
                        print(f"  {label_v:>6} {name:<24} {who}: {weight_bytes / 1e9:.2f} GB of weights x "
                              f"{tps / ids.shape[0]:.1f} steps/s = {frac:.0%} of {gbps:.0f} GB/s", flush=True)
                        rows.append((label_v, f"{name}: {who} bandwidth used", frac * 100, float("nan"), "%"))
        del theirs, ours
        if not args.no_memory:
            for batch in (1, args.batch):
                o, t = measure_memory("ours", args, shape, batch), measure_memory("theirs", args, shape, batch)
                rows.append((label, f"peak mem b{batch}, {args.new_tokens} tok", o, t, "MiB"))
                print(f"  {label:>6} peak mem b{batch:<15} ours {o:8.1f} MiB  transformers {t:8.1f} MiB", flush=True)

    print()
    print("| model | case | llama_edu | transformers 4.37 | ratio |")
    print("|---|---|---:|---:|---:|")
    for label, name, o, t, unit in rows:
        # speed: ours / theirs (higher is better); memory: theirs / ours (higher is better)
        if unit in ("s", "%"):
            print(f"| {label} | {name} | {o:.1f} {unit} | | |")
            continue
        if unit == "ops":  # fewer is better
            ratio = f"{t / o:.2f}x fewer"
        elif unit == "tok/s":
            ratio = f"{o / t:.2f}x"
        else:  # below 0.1 MiB the growth is within the allocator's slack: no meaningful ratio
            ratio = f"{t / o:.2f}x" if o >= 0.1 else "n/a"
        print(f"| {label} | {name} | {o:.1f} {unit} | {t:.1f} {unit} | {ratio} |")


if __name__ == "__main__":
    main()
