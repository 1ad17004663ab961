"""The chat template: Meta's Llama 2 chat format, rendered so that a message's text stays text.

Only the template makes control tokens (``<s>``, ``[INST]``, ``<<SYS>>``, ``</s>``): text inside a message is
encoded as text, whatever it contains. :class:`ChatTemplateMixin` gives the tokenizers ``apply_chat_template``;
a Jinja template (another model's) renders in transformers' sandbox."""

from __future__ import annotations

import re

import torch

from .encoding import BatchEncoding, _to_tensors, check_text


DEFAULT_SYSTEM_PROMPT = """You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. Your \
answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure\
 that your responses are socially unbiased and positive in nature.

If a question does not make any sense, or is not factually coherent, explain why instead of answering something not \
correct. If you don't know the answer to a question, please don't share false information."""


#: Llama 2 chat's markers: written inside a message, they are encoded byte by byte.
_CHAT_MARKER_RE = re.compile(r"\[/?INST\]|<</?SYS>>")
#: Private-use characters that bracket message content while a Jinja template renders.
_OPEN, _CLOSE = "\ue000", "\ue001"


def _mark(content: str) -> str:
    """``content`` with its non-blank core bracketed by _OPEN/_CLOSE (a template's strip()
    then still removes the surrounding blanks, and the markers show where the content is)."""
    core = content.strip()
    if not core:
        return content
    lead = content[: len(content) - len(content.lstrip())]
    return lead + _OPEN + core + _CLOSE + content[len(lead) + len(core):]


def _strip_pieces(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """``"".join(pieces).strip()``, keeping the pieces apart."""
    out = list(pieces)
    for i, (t, c) in enumerate(out):
        out[i] = (t.lstrip(), c)
        if out[i][0]:
            break
    for i in range(len(out) - 1, -1, -1):
        t, c = out[i]
        out[i] = (t.rstrip(), c)
        if out[i][0]:
            break
    return [p for p in out if p[0]]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class ChatTemplateMixin:
    """``apply_chat_template`` and the rendering behind it, for :class:`~llama_edu.text.base.LlamaTokenizerBase`."""


    @property
    def default_chat_template(self) -> str:
        """Meta's Llama 2 chat format as the Jinja template transformers ships (for reference and
        for interop; :meth:`apply_chat_template` renders it in Python)."""
        template = (
            "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
            "{% set system_message = messages[0]['content'] %}"
            "{% elif USE_DEFAULT_PROMPT == true and not '<<SYS>>' in messages[0]['content'] %}"
            "{% set loop_messages = messages %}{% set system_message = 'DEFAULT_SYSTEM_MESSAGE' %}"
            "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
            "{% for message in loop_messages %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if loop.index0 == 0 and system_message != false %}"
            "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
            "{% else %}{% set content = message['content'] %}{% endif %}"
            "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
            "{% elif message['role'] == 'system' %}{{ '<<SYS>>\\n' + content.strip() + '\\n<</SYS>>\\n\\n' }}"
            "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
            "{% endfor %}"
        )
        template = template.replace("USE_DEFAULT_PROMPT", "true" if self.use_default_system_prompt else "false")
        return template.replace("DEFAULT_SYSTEM_MESSAGE", DEFAULT_SYSTEM_PROMPT.replace("\n", "\\n").replace("'", "\\'"))

    def _render_llama2_chat(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """Meta's format: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>``...
        as pieces ``(text, is_message_content)``, so that only the template's own text can
        become control tokens (see :meth:`apply_chat_template`)."""
        if messages[0]["role"] == "system":
            loop_messages, system = messages[1:], messages[0]["content"]
        elif self.use_default_system_prompt and "<<SYS>>" not in messages[0]["content"]:
            loop_messages, system = messages, DEFAULT_SYSTEM_PROMPT
        else:
            loop_messages, system = messages, None
        bos, eos = self.bos_token or "", self.eos_token or ""
        pieces: list[tuple[str, bool]] = []
        for i, message in enumerate(loop_messages):
            role = message["role"]
            if (role == "user") != (i % 2 == 0):
                raise ValueError(
                    "Conversation roles must alternate user/assistant/user/assistant/... (after an optional "
                    f"first system message); message {i + (len(messages) - len(loop_messages))} is {role!r}"
                )
            content = [(message["content"], True)]
            if i == 0 and system is not None:  # the system prompt lives inside the first [INST]
                content = [(B_SYS, False), (system, True), (E_SYS, False)] + content
            content = _strip_pieces(content)
            if role == "user":
                pieces += [(f"{bos}{B_INST} ", False), *content, (f" {E_INST}", False)]
            elif role == "system":
                pieces += [(B_SYS, False), *content, (E_SYS, False)]
            elif role == "assistant":
                pieces += [(" ", False), *content, (f" {eos}", False)]
            else:
                raise ValueError(f"unknown role {role!r}: Llama 2 chat knows 'system', 'user' and 'assistant'")
        return pieces

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> str | list[int] | torch.Tensor:
        """Render a conversation ([{"role": ..., "content": ...}, ...]) in Llama 2's chat format.

        Returns the prompt string (``tokenize=False``) or its ids. Llama 2's format has no
        generation prompt (the model answers right after ``[/INST]``), so
        ``add_generation_prompt`` changes nothing, as in transformers. A ``chat_template``
        (argument or attribute, a Jinja string) is rendered with jinja2 in a sandbox instead.

        Only the template makes control tokens. In the ids, text inside a message that looks
        like a special token (``<s>``, ``</s>``) is encoded as plain text, and the format's
        markers (``[INST]``, ``[/INST]``, ``<<SYS>>``, ``<</SYS>>``) written inside a message
        are encoded byte by byte, so they decode to the same text but are not the ids the
        template uses: a user cannot forge a turn or a system prompt. Conversations without such
        text get exactly transformers' ids. The string (``tokenize=False``) is for reading: it
        cannot tell a message's ``</s>`` from the template's, so feed the model the ids.
        """
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError("apply_chat_template needs a non-empty list of {'role': ..., 'content': ...} messages")
        for m in conversation:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"each message must be a dict with string 'role' and 'content', got {m!r}")
            check_text(m["content"], f"the {m['role']} message")
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            pieces = self._render_llama2_chat(list(conversation))
        else:
            pieces = self._render_jinja(template, list(conversation), add_generation_prompt)
        if not tokenize:
            return "".join(text for text, _ in pieces)
        ids = self._encode_chat(pieces)
        return self._finish_ids(ids, padding, truncation, max_length, return_tensors)

    def _finish_ids(self, ids: list[int], padding: bool | str, truncation: bool, max_length: int | None,
                    return_tensors: str | None) -> list[int] | torch.Tensor:
        """Truncate / pad / tensorise one encoded sequence as ``encode`` does."""
        _, truncation_strategy, max_length = self._padding_truncation_strategies(padding, truncation, max_length, False)
        if truncation_strategy is not None and max_length is not None and len(ids) > max_length:
            ids, _ = self._truncate(ids, None, len(ids) - max_length, truncation_strategy)
        out = self.pad({"input_ids": [ids]}, padding=padding or False, max_length=max_length, _check_pad_token=False)
        out = BatchEncoding({k: v[0] for k, v in out.items()})
        return _to_tensors(out, return_tensors, prepend_batch_axis=True)["input_ids"]

    def _encode_chat(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """Ids of rendered chat pieces ``(text, is_message_content)``: special tokens only where
        the template wrote them, chat markers inside messages byte by byte."""
        text = "".join(t for t, _ in pieces)
        spans, pos = [], 0
        for t, is_content in pieces:
            if is_content and t:
                spans.append((pos, pos + len(t)))
            pos += len(t)

        def in_content(a: int, b: int) -> bool:
            return any(a < e and s < b for s, e in spans)

        specials = list(self._special_split_re().finditer(text))
        real = [m for m in specials if not in_content(m.start(), m.end())]
        tags = sorted(
            (m.start(), m.end()) for s, e in spans for m in _CHAT_MARKER_RE.finditer(text, s, e)
        )
        if len(real) == len(specials) and not tags:  # nothing to neutralise: the usual encoding
            return self._encode_texts([text], False)[0]
        ids: list[int] = []
        start = 0
        for m in real + [None]:
            end = m.start() if m is not None else len(text)
            ids += self._encode_plain_chunk(text, start, end, [t for t in tags if start <= t[0] and t[1] <= end])
            if m is not None:
                ids.append(self._added_tokens_encoder[m.group()])
                start = m.end()
        return ids

    def _encode_plain_chunk(self, text: str, start: int, end: int, tags: list[tuple[int, int]]) -> list[int]:
        """``text[start:end]`` (no special tokens in it) as plain text, the ``tags`` spans as bytes."""
        ids: list[int] = []
        pos, first = start, True
        for a, b in tags + [(end, end)]:
            segment = text[pos:a]
            if segment:
                if first:  # as the usual path encodes a segment: at the start or after a special token
                    ids += self._encode_texts([segment], True, prefix=start == 0)[0]
                else:  # continues right after a marker: no '▁' in front
                    ids += self._encode_continuation(segment)
            if a < b:
                ids += self._byte_ids(text[a:b])
            pos, first = b, first and not segment and a == b
        return ids

    def _encode_continuation(self, segment: str) -> list[int]:
        """Ids of text that continues a word, without the '▁' sentencepiece puts in front."""
        if not self.legacy:
            return self._encode_texts([segment], True, prefix=False)[0]
        anchor = self._encode_texts(["a"], True)[0]  # '▁a': encode 'a' + segment, drop what 'a' gave
        full = self._encode_texts(["a" + segment], True)[0]
        return full[len(anchor):] if full[: len(anchor)] == anchor else full

    def _byte_ids(self, text: str) -> list[int]:
        ids = [self._piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]
        if any(i is None for i in ids):
            raise ValueError(
                f"a message contains the chat marker {text!r}, which this vocabulary (no byte pieces) can only encode "
                "like the template's own marker; remove it from the message"
            )
        return ids  # type: ignore[return-value]

    def _render_jinja(self, template: str, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """Render a Jinja chat template in a sandbox, as pieces ``(text, is_message_content)``:
        each message's content is rendered between two private-use marker characters, which
        are then taken out again and tell where the content went."""
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ImportError("a custom chat_template needs jinja2: pip install jinja2") from None

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        for i, m in enumerate(messages):
            if _OPEN in m["content"] or _CLOSE in m["content"]:
                raise ValueError(f"message {i} contains the private-use characters U+E000/U+E001, which the chat template reserves; remove them")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception

        def render(msgs: list[dict]) -> str:
            try:
                return env.from_string(template).render(
                    messages=msgs, add_generation_prompt=add_generation_prompt, **self.special_tokens_map
                )
            except TemplateError as e:
                raise ValueError(f"the chat template failed: {e}") from e

        plain = render(messages)
        marked = render([{**m, "content": _mark(m["content"])} for m in messages])
        pieces = [(t, i % 2 == 1) for i, t in enumerate(re.split(f"[{_OPEN}{_CLOSE}]", marked))]
        if "".join(t for t, _ in pieces) != plain or marked.count(_OPEN) != marked.count(_CLOSE):
            # The template rewrites message text (upper(), slicing, ...): we cannot tell content from
            # template, so nothing in it may become a control token except the template's BOS/EOS.
            raise ValueError(
                "this chat template changes the messages' text, so their special-token text cannot be kept apart "
                "from the template's; render with tokenize=False and encode with split_special_tokens=True"
            )
        return pieces
