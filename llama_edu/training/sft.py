"""Supervised fine-tuning (SFT, "instruction tuning") on chat-formatted examples.

A pretrained model continues text; a chat model answers. SFT teaches the second behaviour with
the first objective: show the model whole conversations rendered by the tokenizer's chat
template, and train next-token prediction **only on the assistant's tokens**. The prompt is
context, not something to imitate: its labels are -100, which ``cross_entropy`` ignores
(Ouyang et al. 2022 and the Llama 2 paper, section 3.1: "we zero-out the loss on tokens from the
user prompt").

    <s>[INST] Greet Romeo. [/INST] Good morrow, Romeo! </s>
    -100 ...............  -100   ▁Good ▁m orrow , ▁Romeo ! ▁ </s>     <- labels

The labels sit under the tokens themselves; the model shifts them by one inside its loss
(position t predicts token t + 1), exactly as transformers' ``LlamaForCausalLM`` does.

Which tokens are the assistant's? Render the conversation up to each assistant message (with
the template's generation prompt, such as Zephyr's ``<|assistant|>``, when it has one) and up to
its end, tokenize both: the tokens in between are the answer (with its ``</s>``, so the model
learns to stop). That works for any chat template whose rendering of a conversation starts with
the rendering of its beginning (Llama 2's, TinyLlama's/Zephyr's, ChatML); :func:`tokenize_chat`
checks it and says so when a template breaks it.

Batches are **padded** on the right to the longest example (``attention_mask`` 0, labels
-100): with a causal model the padding after a sequence cannot change its earlier positions, and
its labels are ignored. **Packing** (concatenating examples into full-length rows) wastes no
compute on padding but lets examples attend to each other unless the mask is made
block-diagonal; with examples of ~25 tokens, padding costs little, so this module pads.

Data format (JSON Lines, one example per line)::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}], "split": "train"}
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..generation.chat import load_model_and_tokenizer
from ..io.files import PROJECT_DATA_DIR
from .lora import save_lora_adapter
from .loop import RUN_OUTPUTS, LoopConfig, Task, fit

IGNORE_INDEX = -100  # the label cross_entropy skips (transformers' convention)

SFT_DATA = PROJECT_DATA_DIR / "sft_instructions.jsonl"


# -- data --------------------------------------------------------------------------------------


def load_jsonl(path: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """The JSON objects of a JSON Lines file (blank lines skipped), only those whose ``"split"``
    equals ``split`` when it is given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file {path}; the project's own sets are in data/ (see data/README.md)")
    rows = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 JSON Lines") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path.name} line {n} is not valid JSON: {e}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path.name} line {n} is a JSON {type(row).__name__}, not an object: each line must be one "
                             'example, e.g. {"messages": [...]} (SFT) or {"prompt": ..., "chosen": ..., "rejected": ...} (DPO)')
        if split is None or row.get("split") == split:
            rows.append(row)
    if not rows:
        raise ValueError(f"{path.name} has no examples" + (f" with split {split!r}" if split else ""))
    return rows


# -- labels: the assistant's tokens only ------------------------------------------------------


def assistant_labels(input_ids: torch.Tensor, assistant_spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Labels for SFT: ``input_ids`` where a position lies in one of the half-open
    ``[start, end)`` spans of assistant tokens, ``IGNORE_INDEX`` (-100) everywhere else.

    input_ids: (seq,) int64 -> labels (seq,) int64, *not* shifted (the model shifts them).
    """
    keep = torch.zeros(input_ids.shape, dtype=torch.bool)
    for start, end in assistant_spans:
        keep[start:end] = True
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"an example needs a non-empty list of messages, got {messages!r}"[:300])
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"each message must be a dict with string 'role' and 'content', got {m!r}"[:300])
    if not any(m["role"] == "assistant" for m in messages):
        roles = [m["role"] for m in messages]
        raise ValueError(
            f"this example has no assistant turn (roles {roles}), so there is nothing to learn from: "
            "SFT trains on the assistant's answers; add {'role': 'assistant', 'content': ...} after the user message"
        )


def tokenize_chat(tokenizer: Any, messages: Sequence[dict[str, str]], max_length: int | None = None) -> dict[str, Any]:
    """Render ``messages`` with the tokenizer's chat template and find the assistant's tokens.

    Returns ``{"input_ids": (seq,) int64, "labels": (seq,) int64, "spans": [(start, end), ...]}``
    where ``spans`` are the half-open token ranges of the assistant messages (each with the
    template's end-of-turn tokens, e.g. ``</s>``). ``max_length`` truncates on the right (the
    labels with it); an example whose answers would all be cut off is an error.
    """
    _check_messages(messages)
    full = list(tokenizer.apply_chat_template(list(messages)))
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        through = list(tokenizer.apply_chat_template(list(messages[: i + 1])))
        before = []
        if i:
            # With the generation prompt (e.g. Zephyr's "<|assistant|>") the role header is
            # context, not answer; Llama 2's template has none, and both renderings agree.
            before = list(tokenizer.apply_chat_template(list(messages[:i]), add_generation_prompt=True))
            if through[: len(before)] != before:
                before = list(tokenizer.apply_chat_template(list(messages[:i])))
        if through[: len(before)] != before or full[: len(through)] != through:
            raise ValueError(
                "the chat template does not render a conversation as its beginning plus the rest (message "
                f"{i}), so the assistant's tokens cannot be located by prefix; use a prefix-stable template"
            )
        spans.append((len(before), len(through)))
    input_ids = torch.tensor(full, dtype=torch.long)
    if max_length is not None and len(full) > max_length:
        input_ids = input_ids[:max_length]
        spans = [(s, min(e, max_length)) for s, e in spans if s < max_length]
        if not spans:
            raise ValueError(f"max_length={max_length} cuts off every assistant token of this example ({len(full)} tokens)")
    return {"input_ids": input_ids, "labels": assistant_labels(input_ids, spans), "spans": spans}


def collate(examples: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of ``tokenize_chat`` results into a batch:
    ``input_ids`` (batch, longest) padded with ``pad_token_id``, ``attention_mask`` (1 = token,
    0 = padding), ``labels`` padded with -100."""
    if not examples:
        raise ValueError("collate needs at least one example")
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = e["input_ids"], e["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else unk, else eos (padding is masked, so any
    id works; Llama 2 ships without a pad token)."""
    for tid in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise ValueError("the tokenizer has no pad, unk or eos token to pad batches with; set tokenizer.pad_token")


# -- training ----------------------------------------------------------------------------------


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's assistant tokens (labels != -100)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


class ChatDataTask(Task):
    """What the fine-tuning tasks on chat data (SFT, DPO) share: the settings they record for
    ``--resume``, a fingerprint of their rows, the files they own in OUT, and tokens counted by
    the attention mask. Subclasses set ``_record`` and ``_fingerprint``."""

    _record: dict[str, Any]
    _fingerprint: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return self._record

    def fingerprint(self) -> dict[str, Any]:
        return self._fingerprint

    def owns(self, name: str) -> bool:
        return name in RUN_OUTPUTS or bool(MODEL_FILES.fullmatch(name))

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())


class SFTTask(ChatDataTask):
    """Instruction tuning for :func:`llama_edu.training.loop.fit`: :func:`sft_loss` on padded
    batches of chat examples, drawn without replacement and reshuffled each epoch (the order
    comes from ``random.Random(seed)``, the loop's seed)."""

    resume_keys = ("command", "model", "data", "batch_size", "lr", "grad_clip", "seed",
                   "lora_r", "lora_alpha", "lora_targets")

    def __init__(self, model: nn.Module, tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]], batch_size: int = 16,
                 max_length: int | None = None, record: dict[str, Any] | None = None, inputs: Sequence[Any] = ()):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.examples = [tokenize_chat(tokenizer, c, max_length) for c in conversations]
        if not self.examples:
            raise ValueError("there are no conversations to train on")
        self.pad = pad_id(tokenizer)
        self._record, self.inputs = dict(record or {}), tuple(inputs)
        self._fingerprint = _rows_fingerprint([list(c) for c in conversations])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sft_loss(model, batch)

    def batches(self, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        device = next(self.model.parameters()).device
        for picked in _epochs(len(self.examples), self.batch_size, generator.initial_seed()):
            yield {k: v.to(device) for k, v in collate([self.examples[i] for i in picked], self.pad).items()}



def _epochs(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices into ``n`` examples: without replacement, reshuffled each time
    they run out (the leftovers of one shuffle start the next batch)."""
    rng, order = random.Random(seed), []
    while True:
        if len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        picked, order = order[:batch_size], order[batch_size:]
        yield picked


def _rows_fingerprint(rows: Any) -> dict[str, Any]:
    """Enough to tell whether a resumed run trains on the same examples."""
    return {"examples": len(rows), "sha256": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]}


def step_logger(log: Callable[[str], None] | None, log_every: int, steps: int, line: Callable[[int, dict[str, Any]], str]):
    """An ``on_step`` for :func:`fit` that prints ``line(step - 1, history)`` every ``log_every``
    steps (counting from 0, as the notebooks show) and at the last step."""
    def on_step(step: int, history: dict[str, Any], model: nn.Module) -> None:
        if log and ((step - 1) % log_every == 0 or step == steps):
            log(line(step - 1, history))
    return on_step


def train_sft(
    model: nn.Module,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 1e-3,
    warmup_steps: int = 10,
    max_length: int | None = None,
    seed: int = 0,
    log_every: int = 10,
    log: Callable[[str], None] | None = print,
    *,
    grad_clip: float = 1.0,
    precision: str = "auto",
) -> list[float]:
    """Fine-tune the trainable parameters of ``model`` (all of them, or only LoRA adapters after
    :func:`llama_edu.lora.apply_lora`) on ``conversations``: :class:`SFTTask` run by the one
    training loop (AdamW without weight decay, warm-up + cosine LR to lr/10, gradient norm
    clipped at ``grad_clip``).

    Batches are drawn without replacement, reshuffled each epoch, on the model's device.
    Returns the loss of every step. The model is left in eval mode. A non-finite loss or
    non-finite weights stop with :class:`llama_edu.training.loop.NonFiniteLossError`.
    """
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    task = SFTTask(model, tokenizer, conversations, batch_size, max_length)
    config = LoopConfig(steps=steps, lr=lr, warmup_steps=warmup_steps, grad_clip=grad_clip, precision=precision, seed=seed,
                        log_interval=steps, progress=False)
    on_step = step_logger(log, log_every, steps, lambda s, h: f"step {s:4d}  loss {h['train'][-1][1]:.4f}")
    history = fit(task, config, log=None, on_step=on_step)
    return [loss for _, loss in history["train"]]


# -- measuring the format ----------------------------------------------------------------------


@torch.no_grad()
def generate_answers(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[dict[str, str]]], max_new_tokens: int = 16, batch_size: int = 64
) -> list[str]:
    """Greedy answers to chat prompts (each a list of messages ending with the user's), decoded
    without special tokens and stripped; generation stops at ``</s>``."""
    pad, answers = pad_id(tokenizer), []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        encoded = [list(tokenizer.apply_chat_template(list(p))) for p in prompts[start : start + batch_size]]
        longest = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(encoded):  # left padding: every prompt ends where generation starts
            ids[row, longest - len(e) :], mask[row, longest - len(e) :] = torch.tensor(e), 1
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)  # fmt: skip
        answers += [tokenizer.decode(row[longest:].tolist(), skip_special_tokens=True).strip() for row in out]
    return answers


def format_report(answers: Sequence[str], expected: Sequence[str], patterns: Sequence[str]) -> dict[str, float]:
    """How well ``answers`` follow the format: ``"format"`` = fraction that match their regular
    expression in ``patterns`` (the shape of the answer, whatever name it holds), ``"exact"`` =
    fraction equal to the expected answer."""
    if not (len(answers) == len(expected) == len(patterns)) or not answers:
        raise ValueError("answers, expected and patterns must be non-empty and of the same length")
    fmt = sum(bool(re.fullmatch(p, a)) for a, p in zip(answers, patterns)) / len(answers)
    exact = sum(a == e for a, e in zip(answers, expected)) / len(answers)
    return {"format": fmt, "exact": exact}


def evaluate_format(model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], max_new_tokens: int = 16) -> tuple[dict[str, float], list[str]]:
    """Generate greedy answers for held-out ``rows`` (``messages`` ending with the assistant's
    reference answer, and a ``pattern``) and score them with :func:`format_report`."""
    prompts = [r["messages"][:-1] for r in rows]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens)
    report = format_report(answers, [r["messages"][-1]["content"] for r in rows], [r["pattern"] for r in rows])
    return report, answers


# -- the command line and the big version --------------------------------------------------------


#: The files a fine-tuning command writes into OUT itself (the model with its tokenizer, or
#: the adapter); ``--overwrite`` removes these, last/ and the run's JSON files, nothing else.
MODEL_FILES = re.compile(r"(config|generation_config|adapter_config|special_tokens_map|tokenizer_config)\.json|tokenizer\.(model|json)"
                         r"|(model|adapter_model)(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


def save_finetuned(model, tokenizer, out: str | os.PathLike, adapter_only: bool) -> None:
    """What the sft and dpo commands keep: the LoRA adapter alone (PEFT layout), or the whole
    model with its tokenizer (each file group replaced whole)."""
    if adapter_only:
        save_lora_adapter(model, out)
    else:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    print(f"saved to {out}")


def load_for_finetuning(name_or_path: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None):
    """(model, tokenizer) from a local folder or a hub repo id (e.g.
    ``TinyLlama/TinyLlama-1.1B-Chat-v1.0``); ``None`` is the project's Shakespeare model.
    Offline, a hub id raises an ``OSError`` that says what to download and where to put it."""
    return load_model_and_tokenizer(name_or_path, device=device, dtype=dtype)
