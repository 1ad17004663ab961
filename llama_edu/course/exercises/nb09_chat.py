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


def _chat_variant(messages, strip=True, eos=" </s>", bos_each=True, bos="<s>", sys_separate=False, answer_space=" ", inst_space=" ",
                  sys_open="<<SYS>>\n", sys_close="\n<</SYS>>\n\n", system_used=True):
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out = "" if bos_each else bos
    for i, m in enumerate(messages):
        c = m["content"].strip() if strip else m["content"]
        if i == 0 and system is not None and system_used:
            if sys_separate:
                out += sys_open + system + sys_close
            else:
                c = (sys_open + system + sys_close + m["content"]).strip() if strip else sys_open + system + sys_close + c
        if m["role"] == "user":
            out += (bos if bos_each else "") + "[INST]" + inst_space + c + inst_space + "[/INST]"
        else:
            out += answer_space + c + eos
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
        (lambda ms: _chat_variant(ms, answer_space=""), "the space before the assistant's answer is missing: '[/INST] answer </s>'",
         "write ' ' + answer + ' </s>' after [/INST]"),
        (lambda ms: _chat_variant(ms, inst_space=""), "the spaces inside [INST] ... [/INST] are missing", "'[INST] ' + content + ' [/INST]'"),
        (lambda ms: _chat_variant(ms, sys_close="\n<</SYS>>\n"), "the system block must end with '\\n<</SYS>>\\n\\n' (two newlines)",
         "'<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + first user message"),
        (lambda ms: _chat_variant(ms, sys_open="<<SYS>>", sys_close="<</SYS>>"), "the newlines around the system prompt are missing",
         "'<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n'"),
        (lambda ms: _chat_variant(ms, bos=""), "<s> is missing: every user turn starts with <s>[INST]", "prefix each user turn with <s>"),
        (lambda ms: _chat_variant(ms, system_used=False), "the system message is dropped", "put it in a <<SYS>> block at the start of the first user message"),
        (lambda ms: _chat_variant(ms, eos="</s>"), "the space before </s> is missing: each answer ends with ' </s>'", "append ' </s>' after each answer"),
    ],
)
