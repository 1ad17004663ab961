"""DPO: the loss against a value computed by hand, sequence log-probs token by token, the
reference (a frozen copy, or the LoRA base), and a short run on the project's preference set."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llama_edu import LlamaConfig, LlamaForCausalLM, LlamaTokenizer
from llama_edu.files import DEFAULT_MODEL_DIR
from llama_edu.dpo import DPO_DATA, dpo_loss, evaluate_preferences, implicit_reward, sequence_logps, tokenize_pair, train_dpo
from llama_edu.lora import LoraConfig, apply_lora, lora_layers
from llama_edu.sft import collate, load_jsonl

from conftest import SMALL


def test_dpo_loss_by_hand():
    # Pair 1: policy log-ratios chosen -1 - (-2) = 1, rejected -3 - (-2) = -1, so z = beta * 2 = 1.0.
    #   -log sigmoid(1.0) = log(1 + e^-1) = 0.313261687518...
    # Pair 2: chosen -4 - (-3) = -1, rejected -2 - (-2) = 0, so z = 0.5 * -1 = -0.5.
    #   -log sigmoid(-0.5) = log(1 + e^0.5) = 0.974076984180...
    loss = dpo_loss(torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -2.0]), beta=0.5)
    assert math.isclose(loss.item(), (0.3132616875182228 + 0.9740769841801067) / 2, rel_tol=1e-6)
    # Policy equal to the reference: log 2, whatever beta.
    same = torch.tensor([-5.0, -7.0])
    assert math.isclose(dpo_loss(same, same - 1, same, same - 1, beta=3.0).item(), math.log(2), rel_tol=1e-6)
    # Stable far from zero (softplus, not log(sigmoid)).
    assert math.isclose(dpo_loss(torch.tensor([0.0]), torch.tensor([-1000.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0).item(), 0.0, abs_tol=1e-6)
    assert math.isclose(dpo_loss(torch.tensor([-1000.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0).item(), 1000.0, rel_tol=1e-6)
    assert implicit_reward(torch.tensor([-1.0]), torch.tensor([-3.0]), 0.1).item() == pytest.approx(0.2)


def test_sequence_logps_token_by_token():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    a = {"input_ids": torch.tensor([1, 5, 6, 7, 8, 2]), "labels": torch.tensor([-100, -100, -100, 7, 8, 2])}
    b = {"input_ids": torch.tensor([1, 11, 12, 2]), "labels": torch.tensor([-100, -100, 12, 2])}
    with torch.no_grad():
        got = sequence_logps(model, collate([a, b], pad_token_id=0))
        for row, ex in enumerate((a, b)):
            logp = model(ex["input_ids"][None]).logits[0].log_softmax(-1)
            expected = sum(logp[t - 1, ex["input_ids"][t]] for t in range(len(ex["input_ids"])) if ex["labels"][t] != -100)
            assert got[row].item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.fixture(scope="module")
def tok():
    return LlamaTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


def test_pairs_share_the_prompt_and_differ_in_the_answer(tok):
    row = {"prompt": "Greet Romeo.", "chosen": "Good morrow, gentle Romeo!", "rejected": "Good morrow, Romeo!"}
    chosen, rejected = tokenize_pair(tok, row)
    s = chosen["spans"][0][0]
    assert rejected["spans"][0][0] == s and torch.equal(chosen["input_ids"][:s], rejected["input_ids"][:s])
    assert tok.decode(chosen["input_ids"][s:].tolist()).strip() == "Good morrow, gentle Romeo! </s>"
    with pytest.raises(ValueError, match="lacks 'rejected'"):
        tokenize_pair(tok, {"prompt": "x", "chosen": "y"})


def test_clear_errors(tok):
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    with pytest.raises(ValueError, match="no reference model"):
        train_dpo(model, tok, rows, steps=1, log=None)
    with pytest.raises(ValueError, match="separate frozen model"):
        train_dpo(model, tok, rows, reference=model, steps=1, log=None)
    with pytest.raises(ValueError, match="beta must be positive"):
        train_dpo(model, tok, rows, reference=copy.deepcopy(model), beta=0.0, steps=1, log=None)


def test_lora_base_is_the_reference(tok):
    """With LoRA the reference is the model with adapters off: before training the policy equals
    it (loss log 2, margin 0), and the same numbers come from a frozen copy."""
    rows = load_jsonl(DPO_DATA, "test")[:8]
    model = LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).eval()
    frozen = copy.deepcopy(model)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    via_lora = evaluate_preferences(model, tok, rows, reference=None, beta=0.1)
    via_copy = evaluate_preferences(model, tok, rows, reference=frozen, beta=0.1)
    assert via_lora == pytest.approx(via_copy, abs=1e-5)
    assert via_lora["margin"] != 0.0
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.zero_()
    start = evaluate_preferences(model, tok, rows, beta=0.1)
    assert start["margin"] == 0.0 and start["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_short_dpo_run_prefers_the_chosen_answers(tok):
    """12 steps of DPO with LoRA on the project's preference set: the training margin rises and
    held-out pairs (names never trained on) get the higher reward for the chosen answer."""
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
    apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    history = train_dpo(model, tok, load_jsonl(DPO_DATA, "train")[:96], beta=0.1, steps=12, batch_size=8, lr=1e-3, log=None)
    assert history["loss"][0] == pytest.approx(math.log(2), abs=1e-5)
    # The policy starts as the reference (LoRA's B is zero), so the first margin is 0, up to rounding:
    # the reference scored chosen and rejected answers in batches of their own, the step scores them
    # together, and a BLAS may sum the differently padded rows in another order (an AMD host: -4.8e-8).
    assert history["margin"][0] == pytest.approx(0.0, abs=1e-5)
    assert sum(history["margin"][-3:]) / 3 > 0.2
    held_out = evaluate_preferences(model, tok, load_jsonl(DPO_DATA, "test"), beta=0.1)
    assert held_out["reward_accuracy"] > 0.9 and held_out["margin"] > 0.1, held_out


def test_exercise_dpo_loss_both_ways(capsys):
    from llama_edu.exercises import check

    def alternative(pc, pr, rc, rr, beta):  # softplus form, as the package writes it, but per pair then averaged
        z = beta * ((pc - pr) - (rc - rr))
        return torch.stack([torch.nn.functional.softplus(-zi) for zi in z]).mean()

    assert check("dpo_loss", alternative)
    capsys.readouterr()
    for wrong, says in [
        (lambda pc, pr, rc, rr, beta: -torch.nn.functional.logsigmoid(beta * ((pr - rr) - (pc - rc))).mean(), "the sign is flipped"),
        (lambda pc, pr, rc, rr, beta: -torch.nn.functional.logsigmoid(beta * (pc - pr)).mean(), "the reference model is missing"),
        (lambda pc, pr, rc, rr, beta: -torch.nn.functional.logsigmoid((pc - rc) - (pr - rr)).mean(), "beta is missing"),
    ]:
        assert not check("dpo_loss", wrong)
        assert f"Likely mistake: {says}" in capsys.readouterr().out
