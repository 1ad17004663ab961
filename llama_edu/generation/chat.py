"""Chat: a conversation rendered with the chat template, answered by ``generate``.

The tokenizer's chat template (Llama 2: ``<s>[INST] <<SYS>>...<</SYS>> user [/INST] answer
</s><s>[INST] ...``) turns a list of messages into token ids; the model continues after the
last ``[/INST]`` until it emits ``</s>``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from ..io.checkpoint import parse_device
from ..io.files import DEFAULT_MODEL_DIR, looks_like_repo_id
from .decode import context_limit, generate
from ..modeling import LlamaForCausalLM
from .streaming import CallbackStreamer
from ..text.encoding import check_text
from ..training.lora import load_lora_adapter, merge_and_unload, read_lora_config
from ..text.tokenizer import LlamaTokenizer


def chat(model, tokenizer, messages: list[dict[str, str]], streamer: Any = None, **gen_kwargs: Any) -> str:
    """The assistant's answer to ``messages`` ([{"role": "system"|"user"|"assistant",
    "content": ...}, ...], ending with a user turn).

    The conversation is rendered with the tokenizer's chat template (Llama 2:
    ``<s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s><s>[INST] ...``), generation
    stops at ``</s>``, and the new tokens are decoded without special tokens.
    ``gen_kwargs`` go to :func:`generate` (default ``max_new_tokens=256``, greedy).
    """
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("messages must end with a user turn: [..., {'role': 'user', 'content': '...'}]")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    prompt = torch.tensor([ids], dtype=torch.long, device=model.device)
    gen_kwargs.setdefault("max_new_tokens", 256)
    gen_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    gen_kwargs.setdefault("pad_token_id", tokenizer.eos_token_id)
    if streamer is not None and hasattr(streamer, "skip_prompt"):
        streamer.skip_prompt = True
    room = context_limit(model.config) - prompt.shape[1]
    if room <= 0:
        raise ValueError(
            f"the conversation is {prompt.shape[1]} tokens, the model's context is {context_limit(model.config)}: "
            "start a new conversation (/reset) or shorten it"
        )
    gen_kwargs["max_new_tokens"] = min(gen_kwargs["max_new_tokens"], room)
    out = generate(model, prompt, streamer=streamer, **gen_kwargs)
    new_tokens = out[0, prompt.shape[1] :].tolist()
    eos = gen_kwargs["eos_token_id"]
    eos = set([eos] if isinstance(eos, int) else eos or [])
    for i, token in enumerate(new_tokens):  # the answer ends before the first end-of-sequence token
        if token in eos:
            new_tokens = new_tokens[:i]
            break
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def chat_loop(
    model,
    tokenizer,
    system: str | None = None,
    input_stream: TextIO | None = None,
    output_stream: TextIO | None = None,
    output_filter: Callable[[str], str] | None = None,
    **gen_kwargs: Any,
) -> list[dict[str, str]]:
    """A multi-turn conversation on a terminal: read a user line, stream the answer, keep the
    history. ``/reset`` forgets the history, ``/exit`` or end of input (Ctrl-D) ends. Ctrl-C
    during an answer stops that answer (what was said so far stays in the history); Ctrl-C at
    the prompt ends the session (``KeyboardInterrupt``). ``output_filter`` cleans text before it
    is written (the command line strips terminal control characters). Returns the history."""
    input_stream = input_stream or sys.stdin
    output_stream = output_stream or sys.stdout
    interactive = hasattr(input_stream, "isatty") and input_stream.isatty()
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)

    def write(text: str) -> None:
        output_stream.write(output_filter(text) if output_filter else text)
        output_stream.flush()

    if callable(getattr(input_stream, "reconfigure", None)):
        # Bytes that are not UTF-8 reach us as lone surrogates (refused per line below) instead
        # of a UnicodeDecodeError that would end the session.
        with contextlib.suppress(ValueError, OSError, AttributeError):
            input_stream.reconfigure(errors="surrogateescape")
    while True:
        if interactive:
            write("you> ")
        try:
            line = input_stream.readline()
        except UnicodeDecodeError as e:
            write(f"(that line is not valid UTF-8 text: {e.reason}; it was ignored, type it again)\n")
            continue
        if not line:  # EOF
            if interactive:
                write("\n")
            break
        text = line.strip()
        if not text:
            continue
        try:
            check_text(text, "that line")
        except ValueError as e:
            write(f"({e}; it was ignored, type it again)\n")
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(start)
            write("(history cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        write("assistant> ")
        said: list[str] = []

        def show(piece: str) -> None:
            said.append(piece)
            write(piece)

        streamer = CallbackStreamer(tokenizer, show, skip_prompt=True, skip_special_tokens=True)
        try:
            answer = chat(model, tokenizer, history, streamer=streamer, **gen_kwargs)
        except KeyboardInterrupt:
            answer = "".join(said).strip()
            write(" (stopped)")
        write("\n")
        history.append({"role": "assistant", "content": answer})
    return history


def load_model_and_tokenizer(path: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None,
                             default: str | os.PathLike | None = None):
    """Load ``LlamaForCausalLM`` and its tokenizer from a Hugging Face-layout folder (or hub
    repo id) on ``device`` (default: cuda when available) in ``dtype`` (default: as stored).
    ``path=None`` is ``default`` (the project's default model, ``data/shakespeare-llama``, unless
    given: the ``chat`` command passes the chat model, ``data/shakespeare-chat``). A folder that
    holds a LoRA adapter (``adapter_config.json``, no ``config.json``) is loaded on its base model
    (``base_model_name_or_path``, looked up beside the adapter folder first) and merged."""
    if path is None:
        path = Path(default) if default is not None else DEFAULT_MODEL_DIR
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise FileNotFoundError(
                f"the default model data/{path.name} does not exist yet: train it with `python -m llama_edu train` "
                f"(the chat model: scripts/train_chat_model.py) "
                "or pass --model PATH (a folder with config.json, model.safetensors and tokenizer.model)"
            )
    name = os.fspath(path)
    if not os.path.isdir(name) and (os.path.exists(name) or not looks_like_repo_id(name)):
        raise FileNotFoundError(
            f"model folder {name} does not exist: pass --model with a Hugging Face-layout folder "
            "(config.json, model.safetensors, tokenizer.model) or a hub repo id"
        )
    adapter = Path(name) if os.path.isdir(name) and (Path(name) / "adapter_config.json").is_file() \
        and not (Path(name) / "config.json").is_file() else None
    if adapter is not None:
        base = read_lora_config(adapter).base_model_name_or_path
        if not base:
            raise ValueError(f"{adapter}/adapter_config.json names no base_model_name_or_path: load the base model and "
                             "call load_lora_adapter(model, folder) yourself")
        name = os.fspath(adapter.parent / base) if (adapter.parent / base).is_dir() else base
    model = LlamaForCausalLM.from_pretrained(
        name, torch_dtype=dtype or "auto", device=parse_device(device, default="auto"), progress=False
    )
    tokenizer = LlamaTokenizer.from_pretrained(name)
    if adapter is not None:
        model = merge_and_unload(load_lora_adapter(model, adapter))
    return model.eval(), tokenizer
