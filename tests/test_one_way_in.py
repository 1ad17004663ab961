"""One way into the model: generation asks ``LlamaForCausalLM`` for next-token logits through
``next_token_logits`` (which shares :meth:`LlamaForCausalLM.logits`, the one application of the
LM head, with ``forward``); nothing outside modeling.py reaches past that API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import llama_edu
from llama_edu import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel
from llama_edu.generation import generate

from conftest import SMALL, max_diff

PACKAGE = Path(llama_edu.__file__).parent


def _config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**SMALL, "pad_token_id": 0, **overrides})


@pytest.mark.parametrize("cls", [LlamaModel, LlamaForSequenceClassification])
def test_generate_without_lm_head_is_a_type_error_naming_the_class_to_use(cls):
    torch.manual_seed(0)
    model = cls(_config()).eval()
    ids = torch.tensor([[1, 5, 7]])
    for call in (lambda: model.generate(ids, max_new_tokens=2), lambda: generate(model, ids, max_new_tokens=2)):
        with pytest.raises(TypeError, match=rf"\({cls.__name__}\) is not compatible with `\.generate\(\)`.*LlamaForCausalLM"):
            call()


def test_type_error_reads_as_transformers_says_it():
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ids = torch.tensor([[1, 2]])
    with pytest.raises(TypeError) as theirs:
        transformers.LlamaModel(transformers.LlamaConfig(**cfg)).generate(ids, max_new_tokens=2)
    with pytest.raises(TypeError) as ours:
        LlamaModel(LlamaConfig(**cfg)).generate(ids, max_new_tokens=2)
    first_sentence = str(theirs.value).split(" Please")[0]
    assert str(ours.value).startswith(first_sentence)


def test_next_token_logits_is_forward_at_the_last_position():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    ids = torch.randint(3, SMALL["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(6)
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        kept = model(ids, logits_to_keep=1).logits
        step = model.next_token_logits(ids, positions[None].expand(2, -1), positions)
        one = model.next_token_logits(ids[:1], positions[None], positions)  # one row: the column-major head
    assert kept.shape == (2, 1, SMALL["vocab_size"]) and step.shape == (2, SMALL["vocab_size"])
    assert step.dtype == torch.float32
    assert max_diff(kept[:, 0], full) <= 1e-5 and max_diff(step, full) <= 1e-5 and max_diff(one[0], full[0]) <= 1e-5


# -- no module outside modeling.py reaches past the model's API --------------------------------

def _violations(source: str, name: str) -> list[str]:
    """Places in ``source`` that read the LM head, call the core's forward, or reach the base model
    as ``.model`` (or run ``get_base_model()(...)``) to apply a head themselves. Structure goes
    through the public accessors: ``get_base_model().layers``, ``get_input_embeddings()``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute):
            if node.attr == "lm_head":
                found.append(f"{where} reads .lm_head")
            if node.attr == "forward" and isinstance(node.value, ast.Name) and node.value.id in ("LlamaDecoder", "LlamaModel"):
                found.append(f"{where} calls {node.value.id}.forward")
            if node.attr == "model" and not (isinstance(node.value, ast.Name) and node.value.id in ("args", "config", "task", "self")):
                # args.model is a CLI path; a training task or the batcher holds its whole model as .model
                found.append(f"{where} reads the base model as .model")
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "getattr" and any(isinstance(a, ast.Constant) and a.value == "lm_head" for a in node.args):
                found.append(f"{where} getattr(..., 'lm_head')")
            if isinstance(f, ast.Call) and isinstance(f.func, ast.Attribute) and f.func.attr == "get_base_model":
                found.append(f"{where} runs the base model get_base_model()(...)")
    return found


def test_no_module_outside_modeling_reaches_past_the_model_api():
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "modeling.py"]
    assert len(files) > 20  # the scan sees the package
    found = [v for p in files for v in _violations(p.read_text(encoding="utf-8"), str(p.relative_to(PACKAGE.parent)))]
    assert not found, "use model(...) / model.next_token_logits(...) / model.logits(...) instead:\n" + "\n".join(found)


def test_the_scan_catches_what_it_forbids():
    src = (
        "hidden = LlamaDecoder.forward(model.model, ids, pos, pos)[0]\n"
        "logits = model.lm_head(hidden)\n"
        "h = model.model(ids).last_hidden_state\n"
        "h = model.get_base_model()(ids).last_hidden_state\n"
        "head = getattr(model, 'lm_head')\n"
    )
    text = "\n".join(_violations(src, "probe.py"))
    assert not _violations("path = args.model\nsize = config.model\nlayers = model.get_base_model().layers\n", "ok.py")
    for what in ("probe.py:1 calls LlamaDecoder.forward", "probe.py:2 reads .lm_head", "probe.py:3 reads the base model",
                 "probe.py:4 runs the base model get_base_model()(...)", "probe.py:5 getattr(..., 'lm_head')"):
        assert what in text, what
