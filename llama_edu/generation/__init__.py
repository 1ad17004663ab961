"""Generation: logits processors (sampling), the decode loop (decode), streamers, chat.

``llama_edu.generation`` was one module before the package was split by concern; its names stay
importable from here (``from llama_edu.generation import generate``).
"""

from .decode import (
    DecodeState,
    check_input_ids,
    context_limit,
    decode_n_tokens,
    decode_one_token,
    forward_step,
    generate,
    prefill,
)

__all__ = ["DecodeState", "check_input_ids", "context_limit", "decode_n_tokens", "decode_one_token",
           "forward_step", "generate", "prefill"]
