"""Streamers: show generated text as it is produced.

``generate(..., streamer=s)`` calls ``s.put(ids)`` with the prompt, then with each new token,
and ``s.end()`` at the end. A streamer turns these ids into text pieces that are safe to show:
whole words, and never half of a multi-byte character.
"""

from __future__ import annotations

import unicodedata
from queue import Queue
from typing import Any, Callable

import torch


class TextStreamer:
    """Print generated text word by word as ``generate`` produces tokens.

    Tokens are decoded together (a token alone may not decode to its text: SentencePiece
    drops a word's leading space at the start of a string, and an emoji can be spread over
    several byte tokens), and only the new *stable* part is printed: up to the last space, or
    everything at a newline. Text ending in U+FFFD (an incomplete multi-byte character) waits
    for the bytes that complete it. ``skip_prompt=True`` does not echo the prompt;
    ``decode_kwargs`` go to ``tokenizer.decode`` (e.g. ``skip_special_tokens=True``).
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor | list[int]) -> None:
        """Receive token ids: the prompt (1, prompt_len) first, then one token per step."""
        if isinstance(value, torch.Tensor):
            if value.dim() > 1 and value.shape[0] > 1:
                raise ValueError("TextStreamer only supports batch size 1")
            value = value.reshape(-1).tolist()
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(int(v) for v in value)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            printable = text[self.print_len :]  # a line is complete: flush and start afresh
            self.token_cache, self.print_len = [], 0
        elif text.endswith("\ufffd"):
            printable = ""  # the bytes of a multi-byte character are still arriving
        else:
            printable = text[self.print_len : text.rfind(" ") + 1]  # whole words only
            self.print_len += len(printable)
        if printable:
            self.on_finalized_text(printable)

    def end(self) -> None:
        """Flush what is left and finish the line."""
        printable = ""
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            printable = text[self.print_len :]
        self.token_cache, self.print_len = [], 0
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Where finished text goes: stdout here; subclasses send it elsewhere."""
        print(text, flush=True, end="" if not stream_end else "\n")


class TextIteratorStreamer(TextStreamer):
    """A streamer you iterate over: run ``generate`` in a thread and read text pieces as they
    come (for notebooks and user interfaces). ``timeout`` (seconds) bounds each wait."""

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self) -> "TextIteratorStreamer":
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value


class CallbackStreamer(TextStreamer):
    """A TextStreamer that hands each text piece to ``callback`` (used by the chat loop)."""

    def __init__(self, tokenizer, callback: Callable[[str], None], **kw: Any):
        super().__init__(tokenizer, **kw)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.callback(text)


def printable(text: str) -> str:
    """``text`` without control characters other than newline and tab: generated text (byte
    tokens) could otherwise carry terminal escape sequences to the user's terminal."""
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")


class TerminalStreamer(TextStreamer):
    """A :class:`TextStreamer` that prints only :func:`printable` text (the ``generate`` command)."""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        super().on_finalized_text(printable(text), stream_end)
