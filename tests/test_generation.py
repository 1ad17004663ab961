"""generate(), the logits processors, streaming and chat, checked against transformers 4.37."""

from __future__ import annotations

import io
import shutil
import sys
import threading
import warnings

import pytest
import torch

import llama_edu
from llama_edu.chat import chat as chat_fn, chat_loop
from llama_edu.generation import decode as G
from llama_edu import sampling as S
from llama_edu import streaming as ST
from llama_edu.convert import stories260k_hf
from llama_edu.files import find_data_file

from conftest import twins

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as hf_lp  # noqa: E402

PAD = 0


@pytest.fixture(scope="module")
def gqa_twins():
    # 4 query heads sharing 2 kv heads (GQA), context 64.
    return twins(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, seed=1)


def left_padded_batch(vocab: int = 97, seed: int = 0):
    """Three prompts of lengths 7, 4 and 2, left-padded with PAD to length 7."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = PAD
    return ids, mask


@pytest.fixture(scope="module")
def stories260k():
    """The real pretrained stories260K, in transformers and copied into ours."""
    path = stories260k_hf()
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    ours = llama_edu.LlamaForCausalLM(llama_edu.LlamaConfig.from_json_file(path / "config.json")).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


# -- greedy parity ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_greedy_batch(gqa_twins):
    """transformers' greedy continuation of a left-padded batch, with an eos that row 0 emits early
    (so rows finish at different steps)."""
    hf, _ = gqa_twins
    ids, mask = left_padded_batch()
    free = hf.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    eos = int(free[0, 7 + 4])
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    return ids, mask, eos, expected


@pytest.mark.parametrize("cache", ["static", "dynamic", "none"])
def test_greedy_matches_transformers_left_padded_batch(gqa_twins, hf_greedy_batch, cache):
    _, ours = gqa_twins
    ids, mask, eos, expected = hf_greedy_batch
    kw = dict(cache_implementation=cache) if cache != "none" else dict(use_cache=False)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=30, pad_token_id=PAD, eos_token_id=eos, **kw)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    # Row 0 stopped at its eos and was padded afterwards while another row went on.
    assert got[0, 7 + 4] == eos and (got[0, 7 + 5 :] == PAD).all()
    assert got.shape[1] > 7 + 5


def test_greedy_matches_transformers_on_stories260k(stories260k):
    hf, ours = stories260k
    prompt = torch.tensor([[1]])
    expected = hf.generate(prompt, max_new_tokens=200, do_sample=False)
    got = ours.generate(prompt, max_new_tokens=200)
    assert got.shape[1] > 100  # a real story, not an early stop
    assert torch.equal(got, expected)


def test_stories260k_batched_left_padded_matches_transformers(stories260k):
    hf, ours = stories260k
    ids = torch.tensor([[0, 0, 0, 1, 403, 407], [1, 403, 407, 261, 378, 260]])
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=40, pad_token_id=0)
    assert torch.equal(got, expected)
    # Left padding does not change what a row generates (same tokens as the row alone).
    alone = ours.generate(ids[:1, 3:], max_new_tokens=40)
    assert torch.equal(got[0, 3:], alone[0])


def test_static_and_dynamic_cache_give_identical_tokens(stories260k):
    _, ours = stories260k
    prompt = torch.tensor([[1, 403, 407]])
    for kw in (dict(), dict(do_sample=True, seed=3, temperature=0.9, top_p=0.9)):
        static = ours.generate(prompt, max_new_tokens=80, cache_implementation="static", **kw)
        dynamic = ours.generate(prompt, max_new_tokens=80, cache_implementation="dynamic", **kw)
        assert torch.equal(static, dynamic)


def test_max_length_and_default_length(gqa_twins):
    hf, ours = gqa_twins
    ids = torch.tensor([[5, 6, 7]])
    got = ours.generate(ids, max_length=12, eos_token_id=None)
    assert got.shape == (1, 12)
    with pytest.warns(UserWarning, match="max_length=20"):
        got = ours.generate(ids, eos_token_id=None)
    assert torch.equal(got, hf.generate(ids, do_sample=False, eos_token_id=None, pad_token_id=PAD))


def test_fixed_shape_decode_path_matches_transformers(gqa_twins, hf_greedy_batch, monkeypatch):
    """generate(compile=True)'s fixed-shape cache, mask and step, run eagerly (torch.compile
    and the ahead-of-time build replaced by the identity so the test takes a second): same
    tokens as transformers."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(G, "_aot_compile", lambda module, *args: module)
    _, ours = gqa_twins
    ours.__dict__.pop("_compiled_decode_steps", None)  # steps compiled by an earlier test
    ids, mask, eos, expected = hf_greedy_batch
    for _ in range(2):  # the second call reuses the cache (stale slots must not leak)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=30, pad_token_id=PAD, eos_token_id=eos, compile=True)
        assert torch.equal(got, expected)


def test_compiled_generate_matches_eager(monkeypatch):
    """The compiled decode path (about 20 s to compile on 2 cores) gives the eager tokens, on the
    model as from_pretrained loads it (its weights slices of the memory-mapped file: frozen as
    they were, every token after the first came out 0), and other lengths within one cache
    bucket run the same compiled step: nothing is built again (the number of slots attention
    reads is a symbol of the compiled step)."""
    builds = []
    build = G._aot_compile
    monkeypatch.setattr(G, "_aot_compile", lambda *args: builds.append(args[2]) or build(*args))
    ours = llama_edu.LlamaForCausalLM.from_pretrained(stories260k_hf())
    q = ours.model.layers[0].self_attn.q_proj.weight
    assert q.untyped_storage().nbytes() > q.numel() * q.element_size()  # a view into the mapped file
    prompt = torch.tensor([[1]])
    assert torch.equal(ours.generate(prompt, max_new_tokens=100, compile=True), ours.generate(prompt, max_new_tokens=100))
    assert builds == [256]  # the ahead-of-time step, for the first cache bucket
    for n in (60, 150):
        assert torch.equal(ours.generate(prompt, max_new_tokens=n, compile=True), ours.generate(prompt, max_new_tokens=n))
    # Attention reads only the slots written so far, not the whole bucket behind a mask: NaN in
    # every slot (a masked NaN value still poisons the weighted sum, 0 x NaN) changes nothing.
    with torch.inference_mode():  # (the cache was made in generate's inference mode)
        for cache, _, _ in ours.__dict__["_compiled_decode_steps"].values():
            for t in cache.key_cache + cache.value_cache:
                t.fill_(float("nan"))
    assert torch.equal(ours.generate(prompt, max_new_tokens=100, compile=True), ours.generate(prompt, max_new_tokens=100))
    assert builds == [256]


def _fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "ahead-of-time" in str(w.message)]


def test_compiled_step_follows_the_weights(stories260k):
    """On a CPU, compile=True freezes the weights into the compiled code. A second model of the
    same shape gets a step of its own, and weights changed in place are compiled again: the
    compiled tokens are always the eager tokens of the weights as they are now."""
    import copy

    _, ours = stories260k
    prompt = torch.tensor([[1]])
    other = copy.deepcopy(ours)  # a copy starts without compiled steps
    assert "_compiled_decode_steps" not in other.__dict__ or not other.__dict__["_compiled_decode_steps"]
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(-1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mine = ours.generate(prompt, max_new_tokens=100, compile=True)
        theirs = other.generate(prompt, max_new_tokens=100, compile=True)
        assert torch.equal(mine, ours.generate(prompt, max_new_tokens=100))
        assert torch.equal(theirs, other.generate(prompt, max_new_tokens=100))
        assert not torch.equal(mine, theirs)  # the two models really differ
        with torch.no_grad():
            other.model.layers[0].mlp.down_proj.weight.mul_(-1)  # in place: back to ours
        assert torch.equal(other.generate(prompt, max_new_tokens=100, compile=True), mine)
    assert not _fallback_warnings(record)  # the frozen ahead-of-time step itself ran (no fallback)


def test_compiled_step_follows_the_settings(stories260k):
    """The compiled step has no guards on the model: generate checks the model itself once per
    call (decode._model_key), and a setting changed after compiling (here a layer's activation
    function) is compiled again, never run stale."""
    import torch.nn.functional as F

    _, ours = stories260k
    prompt = torch.tensor([[1]])
    before = ours.generate(prompt, max_new_tokens=60, compile=True)
    mlp = ours.model.layers[0].mlp
    try:
        mlp.act_fn = F.relu
        changed = ours.generate(prompt, max_new_tokens=60, compile=True)
        assert torch.equal(changed, ours.generate(prompt, max_new_tokens=60))
        assert not torch.equal(changed, before)  # the setting matters to these tokens
    finally:
        mlp.act_fn = F.silu


def test_compiled_step_tells_padded_from_unpadded_batches(gqa_twins):
    """The same model and batch size, unpadded, then left-padded, then unpadded again, runs the
    compiled step of each case (a padding mask is an input of one of them only), each time with
    the eager tokens."""
    _, ours = gqa_twins
    ours.__dict__.pop("_compiled_decode_steps", None)
    ids, mask = left_padded_batch()
    full = torch.randint(3, 97, ids.shape, generator=torch.Generator().manual_seed(1))  # no pad ids
    for prompt, prompt_mask in ((full, None), (ids, mask), (full, None)):
        kw = dict(attention_mask=prompt_mask, max_new_tokens=12, pad_token_id=PAD)
        assert torch.equal(ours.generate(prompt, compile=True, **kw), ours.generate(prompt, **kw))
    ours.__dict__.pop("_compiled_decode_steps", None)


def test_model_key_sees_what_the_compiled_step_bakes_in():
    """_model_key, which stands in for dynamo's guards on the model, changes with each kind of
    change a frozen compiled step would otherwise miss, and only then."""
    from llama_edu import quantize as Q

    model = llama_edu.LlamaForCausalLM(llama_edu.LlamaConfig.from_preset("tiny")).eval()
    Q.quantize(model.model.layers[0], "int8")
    key = G._model_key(model)
    assert G._model_key(model) == key  # nothing changed, nothing to compile
    layer = model.model.layers[0]
    changes = [
        lambda: layer.mlp.down_proj.weight_int8.add_(1),  # a weight written in place
        lambda: model.model.norm.weight.detach().mul_(2),  # (as an optimizer or load_state_dict writes)
        lambda: setattr(model.model.layers[1].mlp, "down_proj", torch.nn.Linear(1, 1)),  # a module replaced
        lambda: model.train(),
        lambda: model.model.norm.register_forward_hook(lambda *a: None),
        lambda: setattr(model.model.norm, "variance_epsilon", 0.5),  # a module's setting
        lambda: Q.set_compute_dtype(model, torch.bfloat16),  # a quantized layer's kernel dtype
        lambda: setattr(model.config, "attn_implementation", "eager"),  # the config's
        lambda: model.model.rotary_emb.__dict__.update(base=500.0),
    ]
    for change in changes:
        change()
        new = G._model_key(model)
        assert new != key
        key = new


def test_a_model_loaded_in_inference_mode_generates():
    """Weights made under torch.inference_mode count no writes (reading their write counter
    raised): the eager, quantized and compiled-step paths key them by address instead."""
    from llama_edu import quantize as Q

    with torch.inference_mode():
        model = llama_edu.LlamaForCausalLM.from_pretrained(stories260k_hf())
        prompt = torch.tensor([[1]])
        plain = model.generate(prompt, max_new_tokens=8)
        assert model.lm_head.weight.is_inference()
        G._own_storages(model)  # what compile=True does first: the mapped weights get storages of their own
        q = model.model.layers[0].self_attn.q_proj.weight
        assert q.is_inference() and q.untyped_storage().nbytes() == q.numel() * q.element_size()
        assert torch.equal(model.generate(prompt, max_new_tokens=8), plain)
        assert G._model_key(model) == G._model_key(model)
        Q.set_compute_dtype(Q.quantize(model, "int8"), torch.bfloat16)
        assert model.generate(prompt, max_new_tokens=8).shape == plain.shape


def test_an_interrupted_build_is_built_again(gqa_twins, monkeypatch):
    """Ctrl-C during the ahead-of-time build (20-30 s) keeps nothing half-built: the next
    generate builds the step again and decodes the eager tokens (the build is replaced by the
    identity, which runs the step eagerly, so the test takes a second)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    builds = []

    def build(module, *args):
        builds.append(module)
        if len(builds) == 1:
            raise KeyboardInterrupt
        return module

    monkeypatch.setattr(G, "_aot_compile", build)
    _, ours = gqa_twins
    ours.__dict__.pop("_compiled_decode_steps", None)
    kw = dict(max_new_tokens=12, pad_token_id=PAD)
    prompt = torch.tensor([[3, 4, 5]])
    with pytest.raises(KeyboardInterrupt):
        ours.generate(prompt, compile=True, **kw)
    assert torch.equal(ours.generate(prompt, compile=True, **kw), ours.generate(prompt, **kw))
    assert len(builds) == 2
    ours.__dict__.pop("_compiled_decode_steps", None)


_DELETED_MODEL_PROBE = """
import gc, json, weakref, torch, llama_edu
def deleted_files_mapped():  # bytes mapped from files deleted since (the build's library and weights)
    total = 0
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("(deleted)"):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            total += high - low
    return total
torch.manual_seed(0)
config = llama_edu.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, max_position_embeddings=64)
model = llama_edu.LlamaForCausalLM(config).eval()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
head = weakref.ref(model.lm_head.weight)
before = deleted_files_mapped()
prompt = torch.tensor([[1, 2, 3]])
same = torch.equal(model.generate(prompt, max_new_tokens=6, compile=True), model.generate(prompt, max_new_tokens=6))
del model
gc.collect()
print(json.dumps({"same": same, "weights": weights, "mapped": deleted_files_mapped() - before, "head_alive": head() is not None}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's memory map in /proc")
def test_a_deleted_compiled_model_leaves_nothing_behind():
    """A notebook that compiles one model after another kept every one of them: the ahead-of-time
    library held the frozen weights inside it and is never unloaded, and torch.export's last trace
    held the model's modules, so deleting the model freed nothing (the stories15M shape: 98 MB
    more resident per model compiled). In a fresh process (one build, about 20 s): after
    ``del model``, no weight is alive and no more than a quarter of the weights' bytes stay mapped
    from the build's deleted files."""
    import json
    import subprocess

    run = subprocess.run([sys.executable, "-c", _DELETED_MODEL_PROBE], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["same"]
    assert not got["head_alive"], "the deleted model's weights are still referenced"
    assert got["mapped"] < got["weights"] / 4, got


def test_compiled_step_falls_back_when_inductor_cannot_freeze(gqa_twins, monkeypatch):
    """Where inductor cannot build the frozen ahead-of-time step (here: its C++ compiler is
    missing, caches off), generate warns and decodes with the plain compiled step: the same tokens."""
    _, ours = gqa_twins
    ours.__dict__.pop("_compiled_decode_steps", None)
    monkeypatch.setattr(G, "_frozen_cpu_options", lambda model: {"freezing": True, "force_disable_caches": True, "cpp.cxx": (None, "/nonexistent/c++")})
    prompt = torch.tensor([[3, 4, 5]])
    with pytest.warns(UserWarning, match="ahead-of-time CPU step did not build"):
        got = ours.generate(prompt, max_new_tokens=12, pad_token_id=PAD, compile=True)
    assert torch.equal(got, ours.generate(prompt, max_new_tokens=12, pad_token_id=PAD))
    ours.__dict__.pop("_compiled_decode_steps", None)


# -- sampling --------------------------------------------------------------------------------


def test_sampling_matches_transformers_draw_for_draw(gqa_twins):
    """Same logits, same processors, same global RNG -> the same multinomial draws."""
    hf, ours = gqa_twins
    ids, mask = left_padded_batch(seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=25, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
              repetition_penalty=1.3, min_new_tokens=5, pad_token_id=PAD, eos_token_id=[4, 9],
              num_return_sequences=2)
    torch.manual_seed(123)
    expected = hf.generate(ids, **kw)
    torch.manual_seed(123)
    got = ours.generate(ids, **kw)
    assert got.shape == expected.shape == (6, expected.shape[1])
    assert torch.equal(got, expected)


def test_seeded_sampling_is_reproducible(stories260k):
    _, ours = stories260k
    prompt = torch.tensor([[1]])
    a = ours.generate(prompt, max_new_tokens=40, do_sample=True, seed=0)
    b = ours.generate(prompt, max_new_tokens=40, do_sample=True, seed=0)
    c = ours.generate(prompt, max_new_tokens=40, do_sample=True, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=40, do_sample=True, generator=g), a)


def test_top_k_1_sampling_is_greedy(stories260k):
    _, ours = stories260k
    prompt = torch.tensor([[1, 403]])
    greedy = ours.generate(prompt, max_new_tokens=50)
    assert torch.equal(ours.generate(prompt, max_new_tokens=50, do_sample=True, top_k=1, seed=7), greedy)


def test_one_row_stops_at_its_eos_as_transformers_does(stories260k):
    """A single row reads its own token to stop (no mask of unfinished rows): the same tokens
    and length as transformers, with one eos id and with the second of two."""
    hf, ours = stories260k
    prompt = torch.tensor([[1]])
    free = ours.generate(prompt, max_new_tokens=40, eos_token_id=None)
    for eos in (int(free[0, 9]), [int(free[0, 30]), int(free[0, 12])]):
        got = ours.generate(prompt, max_new_tokens=40, eos_token_id=eos, pad_token_id=0)
        expected = hf.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0)
        assert got.shape[1] < free.shape[1] and torch.equal(got, expected)


def test_min_new_tokens_suppresses_eos(stories260k):
    _, ours = stories260k
    prompt = torch.tensor([[1]])
    free = ours.generate(prompt, max_new_tokens=30, eos_token_id=None)
    stop = int(free[0, 6])  # treat the 6th new token as end-of-sequence
    first = free[0, 1:].tolist().index(stop)
    assert ours.generate(prompt, max_new_tokens=30, eos_token_id=stop).shape[1] == 1 + first + 1
    longer = ours.generate(prompt, max_new_tokens=30, min_new_tokens=12, eos_token_id=stop, pad_token_id=0)
    assert stop not in longer[0, 1:13].tolist()
    assert longer.shape[1] > 13


# -- logits processors against transformers' ------------------------------------------------


@pytest.mark.parametrize(
    "ours_fn, theirs_fn",
    [
        (lambda: S.RepetitionPenaltyLogitsProcessor(1.5), lambda: hf_lp.RepetitionPenaltyLogitsProcessor(1.5)),
        (lambda: S.RepetitionPenaltyLogitsProcessor(0.7), lambda: hf_lp.RepetitionPenaltyLogitsProcessor(0.7)),
        (lambda: S.TemperatureLogitsWarper(0.6), lambda: hf_lp.TemperatureLogitsWarper(0.6)),
        (lambda: S.TopKLogitsWarper(5), lambda: hf_lp.TopKLogitsWarper(5)),
        (lambda: S.TopKLogitsWarper(500), lambda: hf_lp.TopKLogitsWarper(500)),
        (lambda: S.TopPLogitsWarper(0.9), lambda: hf_lp.TopPLogitsWarper(0.9)),
        (lambda: S.TopPLogitsWarper(0.3), lambda: hf_lp.TopPLogitsWarper(0.3)),
        (lambda: S.TopPLogitsWarper(0.0), lambda: hf_lp.TopPLogitsWarper(0.0)),
        (lambda: S.TopPLogitsWarper(0.5, min_tokens_to_keep=3), lambda: hf_lp.TopPLogitsWarper(0.5, min_tokens_to_keep=3)),
        (lambda: S.MinNewTokensLengthLogitsProcessor(4, 3, [2, 7]), lambda: hf_lp.MinNewTokensLengthLogitsProcessor(4, 3, [2, 7])),
    ],
)
def test_processors_match_transformers(ours_fn, theirs_fn):
    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 3.0, 10.0):
        scores = torch.randn(4, 50, generator=g) * scale
        scores[1, 10] = scores[1, 11]  # a tie
        input_ids = torch.randint(0, 50, (4, 6), generator=g)
        expected = theirs_fn()(input_ids, scores.clone())
        got = ours_fn()(input_ids, scores.clone())
        assert torch.equal(got, expected)


def test_top_p_keeps_at_least_one_and_filters_with_minus_inf():
    scores = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    out = S.TopPLogitsWarper(0.01)(None, scores.clone())
    assert out[0, 0] == 5.0 and torch.isinf(out[0, 1:]).all() and (out[0, 1:] < 0).all()


def test_processor_order_is_transformers_order():
    procs = S.build_logits_processors(True, 0.7, 10, 0.9, 1.2, 3, 5, [2])
    assert [type(p).__name__ for p in procs] == [
        "RepetitionPenaltyLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
        "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper",
    ]
    assert S.build_logits_processors(False, 0.7, 10, 0.9) == []  # warpers only when sampling


# -- input validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=None, max_length=3), "max_length"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-2), "max_new_tokens"),
        (dict(max_new_tokens=100), "context of 64"),
        (dict(input_ids=torch.tensor([[1, 97]])), "outside the vocabulary"),
        (dict(input_ids=torch.tensor([[-1, 3]])), "outside the vocabulary"),
        (dict(input_ids=torch.tensor([1, 2, 3, 4]).view(1, 2, 2)), "2-D"),
        (dict(do_sample=True, temperature=0.0), "do_sample=False"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(cache_implementation="paged"), "cache_implementation"),
        (dict(seed=1, generator=torch.Generator()), "seed or generator"),
        (dict(attention_mask=torch.ones(1, 3)), "attention_mask"),
        (dict(compile=True, use_cache=False), "use_cache"),
    ],
)
def test_bad_arguments_raise_clear_errors(gqa_twins, kwargs, match):
    _, ours = gqa_twins
    kwargs = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "max_new_tokens": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        ours.generate(**kwargs)


def test_rope_scaling_extends_the_allowed_length():
    cfg = llama_edu.LlamaConfig(**{**dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, max_position_embeddings=16),
                                   "rope_scaling": {"type": "linear", "factor": 2.0}})
    model = llama_edu.LlamaForCausalLM(cfg).eval()
    assert G.context_limit(cfg) == 32
    assert model.generate(torch.tensor([[1, 2]]), max_new_tokens=25, eos_token_id=None).shape == (1, 27)
    with pytest.raises(ValueError, match="context of 32"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=31)


def test_pad_defaults_to_eos_with_warning(gqa_twins):
    _, ours = gqa_twins
    with pytest.warns(UserWarning, match="pad_token_id"):
        ours.generate(torch.tensor([[1, 5]]), max_new_tokens=3)


def test_right_padding_warns(gqa_twins):
    _, ours = gqa_twins
    ids = torch.tensor([[5, 6, 7], [5, 6, PAD]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.warns(UserWarning, match="right padding"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=PAD)


# -- streaming -------------------------------------------------------------------------------


class CharTokenizer:
    """A fake tokenizer: id i is chr(i); 256+ are UTF-8 byte tokens (like SentencePiece byte fallback)."""

    def decode(self, ids, skip_special_tokens=False):
        out, pending = [], b""
        for i in ids:
            if i >= 256:
                pending += bytes([i - 256])
            else:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = b""
                out.append(chr(i))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


class Collect(ST.TextStreamer):
    def __init__(self, tokenizer, **kw):
        super().__init__(tokenizer, **kw)
        self.pieces: list[str] = []

    def on_finalized_text(self, text, stream_end=False):
        self.pieces.append(text)


def stream(streamer, prompt, tokens):
    streamer.put(torch.tensor([prompt]))
    for t in tokens:
        streamer.put(torch.tensor([t]))
    streamer.end()
    return streamer.pieces


def test_text_streamer_prints_whole_words_and_waits_for_multibyte_chars():
    tok = CharTokenizer()
    smile = [256 + b for b in "😀".encode()]  # 4 byte tokens
    new = [ord(c) for c in "hi "] + smile + [ord(c) for c in " you\nok"]
    pieces = stream(Collect(tok), [ord("A"), ord(" ")], new)
    assert "".join(pieces) == "A hi 😀 you\nok"
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[:3] == ["A ", "hi ", "😀 "]  # word by word, the emoji only once complete
    skipped = stream(Collect(tok, skip_prompt=True), [ord("A"), ord(" ")], new)
    assert "".join(skipped) == "hi 😀 you\nok"


def test_text_streamer_with_metas_tokenizer_emoji():
    from llama_edu.tokenizer import LlamaTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = LlamaTokenizer.from_pretrained(find_data_file("llama2-tokenizer.model"))
    text = "Hello 😀 wörld 日本 🦙!"
    ids = tok.encode(text)  # with BOS; emoji become <0xF0><0x9F>... byte-fallback tokens
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    pieces = stream(Collect(tok, skip_special_tokens=True), ids[:1], ids[1:])
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 3


def test_text_streamer_prints_to_stdout_during_generate(stories260k, capsys):
    _, ours = stories260k
    tok = CharTokenizer()  # stories260K ids < 512 are printable as chr(); good enough for the plumbing
    out = ours.generate(torch.tensor([[1]]), max_new_tokens=20, streamer=ST.TextStreamer(tok))
    printed = capsys.readouterr().out
    assert printed == tok.decode(out[0].tolist()) + "\n"


def test_text_iterator_streamer_in_a_thread(stories260k):
    _, ours = stories260k
    tok = CharTokenizer()
    streamer = ST.TextIteratorStreamer(tok, skip_prompt=True, timeout=30)
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("ids", ours.generate(torch.tensor([[1]]), max_new_tokens=30, streamer=streamer))
    )
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == tok.decode(result["ids"][0, 1:].tolist())


def test_streamer_refuses_batches(gqa_twins):
    _, ours = gqa_twins
    with pytest.raises(ValueError, match="one sequence"):
        ours.generate(torch.tensor([[1, 2], [3, 4]]), max_new_tokens=2, streamer=Collect(CharTokenizer()))


# -- chat ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model():
    """A random model with the project tokenizer's vocabulary (shows the mechanics only)."""
    from llama_edu.tokenizer import LlamaTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = LlamaTokenizer.from_pretrained(llama_edu.files.PROJECT_DATA_DIR / "tokenizer.model")
    torch.manual_seed(0)
    cfg = llama_edu.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=256)
    return llama_edu.LlamaForCausalLM(cfg).eval(), tok


def test_chat_uses_template_and_stops_at_eos(chat_model):
    model, tok = chat_model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert tok.decode(prompt).startswith("<s>[INST] <<SYS>>")  # rendered through the Llama-2 template
    free = model.generate(torch.tensor([prompt]), max_new_tokens=12, eos_token_id=None)[0, len(prompt):].tolist()
    stop = free[5]
    first = free.index(stop)
    answer = chat_fn(model, tok, messages, max_new_tokens=12, eos_token_id=stop)
    assert answer == tok.decode(free[:first], skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="user turn"):
        chat_fn(model, tok, messages[:1])


def test_chat_loop_keeps_history_and_resets(chat_model):
    model, tok = chat_model
    out = io.StringIO()
    history = chat_loop(model, tok, system="sys", input_stream=io.StringIO("hello\nhow now?\n/reset\nagain\n"),
                          output_stream=out, max_new_tokens=5)
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "again"
    text = out.getvalue()
    assert text.count("assistant> ") == 3 and "(history cleared)" in text


def test_pad_token_and_cache_size_are_checked_before_anything_runs():
    torch.manual_seed(0)
    cfg = llama_edu.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2**40)
    model = llama_edu.LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="pad_token_id=500"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, pad_token_id=500)
    with pytest.raises(ValueError, match=r"needs \d+.* GiB .*cache_implementation='dynamic'"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2**38)  # terabytes of cache: refused up front


def test_explicit_positions_past_the_context_warn():
    torch.manual_seed(0)
    model = llama_edu.LlamaForCausalLM(llama_edu.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112,
                                                              num_hidden_layers=1, num_attention_heads=8,
                                                              max_position_embeddings=32)).eval()
    with pytest.warns(UserWarning, match="longer than max_position_embeddings"):
        model(torch.tensor([[1, 2]]), position_ids=torch.tensor([[40, 41]]))


_PROBE = """
import struct, sys, warnings  # struct is imported at start-up, before a script's folder can shadow it
if len(sys.argv) > 1:
    sys.path.insert(0, sys.argv[1])  # where a script's or notebook's own folder goes
from llama_edu.generation.decode import warn_if_scalar_kernels
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    print(warn_if_scalar_kernels())
print(*[w.message for w in record], sep="\\n")
"""


@pytest.mark.skipif(
    not torch.cpu.get_capabilities().get("avx2") or not (shutil.which("c++") or shutil.which("g++")),
    reason="needs an x86 CPU with AVX2 and a C++ compiler (what inductor's vector probe builds with)",
)
def test_compile_warns_when_inductor_would_write_scalar_kernels(tmp_path):
    """A learner's struct.py beside a notebook made inductor's check of the CPU's vector
    instructions fail (it loads a library in a child Python given the parent's sys.path), so
    compile=True ran scalar kernels, several times slower, with no error. It now warns and names
    the file; with the folder not on sys.path it stays silent."""
    import subprocess

    (tmp_path / "struct.py").write_text("# a learner's experiments with binary formats\nrecord_size = 12\n")
    run = lambda *args: subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True,  # noqa: E731
                                       text=True, timeout=300, cwd=tmp_path.parent)
    shadowed, clean = run(str(tmp_path)), run()
    assert shadowed.returncode == 0 and clean.returncode == 0, shadowed.stderr + clean.stderr
    assert clean.stdout.split("\n")[0] == "False" and "compile=True" not in clean.stdout
    assert shadowed.stdout.split("\n")[0] == "True", shadowed.stdout
    assert "scalar" in shadowed.stdout and str(tmp_path / "struct.py") in shadowed.stdout and "rename" in shadowed.stdout
