"""``generate`` and ``chat``: run the model on the terminal."""

from __future__ import annotations

import argparse
from typing import Any


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """--greedy / --temperature 0 mean greedy; otherwise seeded sampling."""
    if args.greedy or args.temperature == 0:
        return dict(do_sample=False)
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    return dict(do_sample=True, temperature=float(args.temperature), top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ..generation import chat
    from ..generation.decode import context_limit, generate
    from ..generation.streaming import TerminalStreamer
    from ..text.encoding import check_text

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    check_text(args.prompt, "--prompt")
    model, tokenizer = chat.load_model_and_tokenizer(args.model, args.device, args.dtype)
    ids = tokenizer.encode(args.prompt)
    room = context_limit(model.config) - len(ids)
    if room <= 0:
        raise ValueError(f"the prompt is {len(ids)} tokens, the model's context is {context_limit(model.config)}: shorten it")
    streamer = TerminalStreamer(tokenizer, skip_special_tokens=True)
    try:
        generate(
            model, torch.tensor([ids]), max_new_tokens=min(args.max_new_tokens, room),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, streamer=streamer,
            **_sampling_kwargs(args),
        )
    except KeyboardInterrupt:  # Ctrl-C: show what was generated, then stop quietly
        streamer.end()
        return 130
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from ..generation import chat
    from ..generation.streaming import printable
    from ..io.files import DEFAULT_CHAT_MODEL_DIR

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model, tokenizer = chat.load_model_and_tokenizer(args.model, args.device, args.dtype, default=DEFAULT_CHAT_MODEL_DIR)
    try:
        chat.chat_loop(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens,
                       output_filter=printable, **_sampling_kwargs(args))
    except KeyboardInterrupt:  # Ctrl-C at the prompt ends the session (Ctrl-C in an answer only stops it)
        print()
        return 130
    return 0


def _add_common(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--model", default=None, help="model folder (HF layout, or a LoRA adapter folder) or hub repo id; default: data/shakespeare-llama (chat: data/shakespeare-chat)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=200, help="how many tokens to generate at most (default 200)")
    p.add_argument("--temperature", type=float, default=temperature, help=f"sampling temperature, 0 = greedy (default {temperature})")
    p.add_argument("--top-k", "--top_k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)")
    p.add_argument("--top-p", "--top_p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="random seed, so runs repeat (default 0)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..generation import server

    try:
        server.require_serving()
    except ImportError as e:  # fastapi / uvicorn missing: it says what to install
        raise ValueError(str(e)) from None
    server.serve(args.model_dir, args.host, args.port, args.slots, args.device, args.dtype)
    return 0


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)",
                              description="Serve a model with an OpenAI-compatible API: /v1/models, /v1/completions, "
                                          "/v1/chat/completions. Needs pip install \"llama_edu[serve]\".")
    p.add_argument("model_dir", metavar="MODEL_DIR", nargs="?", default=None,
                   help="model folder (HF layout) or hub repo id; default: data/shakespeare-llama")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together at most (rows of KV cache, default 8)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.set_defaults(func=_cmd_serve)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``generate``, ``chat`` and ``serve``."""
    p = subparsers.add_parser("generate", help="stream a continuation of a prompt",
                              description="Continue a prompt with a Llama model, streaming the text.")
    p.add_argument("--prompt", required=True, help="the text to continue")
    _add_common(p, temperature=0.8)
    p.set_defaults(func=_cmd_generate)

    p = subparsers.add_parser("chat", help="multi-turn chat with a chat model",
                              description="Chat on the terminal (Llama 2 chat template). /reset clears the history; Ctrl-D ends.")
    p.add_argument("--system", default=None, help="a system prompt")
    _add_common(p, temperature=0.8)
    p.set_defaults(func=_cmd_chat)
    _add_serve(subparsers)
