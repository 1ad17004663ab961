"""Exercises of notebook 09_chat."""

from __future__ import annotations

import functools
from ...io.files import PROJECT_DATA_DIR
from ...text.tokenizer import LlamaTokenizer

from .checking import Cases, register


@functools.lru_cache(maxsize=1)
def _chat_tokenizer() -> LlamaTokenizer:
    return LlamaTokenizer.from_pretrained(PROJECT_DATA_DIR / "tokenizer.model", legacy=True)


_SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
_TURNS = [{"role": "user", "content": "What is RoPE?"}, {"role": "assistant", "content": "  A rotation of q and k.  "},
          {"role": "user", "content": " And RMSNorm? "}]


def _chat_cases() -> Cases:
    return [("one user message", ([_TURNS[0]],)), ("system + user", ([_SYSTEM, _TURNS[0]],)),
            ("system + three turns", ([_SYSTEM, *_TURNS],)), ("three turns, spaces around the content", (list(_TURNS),))]


def _chat_variant(messages, strip=True, eos=" </s>", bos_each=True, sys_separate=False):
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = "" if bos_each else "<s>"
    for i, m in enumerate(messages):
        c = m["content"].strip() if strip else m["content"]
        if i == 0 and system is not None:
            if sys_separate:
                out += "<<SYS>>\n" + system + "\n<</SYS>>\n\n"
            else:
                c = ("<<SYS>>\n" + system + "\n<</SYS>>\n\n" + m["content"]).strip() if strip else "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + c
        if m["role"] == "user":
            out += ("<s>" if bos_each else "") + "[INST] " + c + " [/INST]"
        else:
            out += " " + c + eos
    return out


register(
    "llama2_chat_prompt", "09_chat", "(messages)", "the Llama 2 chat prompt string for a list of {'role', 'content'} messages",
    reference=lambda messages: _chat_tokenizer().apply_chat_template(messages, tokenize=False),
    cases=_chat_cases,
    mistakes=[
        (lambda ms: _chat_variant(ms, strip=False), "the message contents are not stripped of surrounding spaces", "use content.strip()"),
        (lambda ms: _chat_variant(ms, eos=""), "the assistant's answer is not closed by </s>", "append ' </s>' after each answer"),
        (lambda ms: _chat_variant(ms, bos_each=False), "<s> is written once at the start; every [INST] turn starts with <s>", "prefix each user turn with <s>"),
        (lambda ms: _chat_variant(ms, sys_separate=True), "the system prompt is written before [INST]; it lives inside the first [INST]",
         "prepend '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' to the first user message"),
    ],
)
