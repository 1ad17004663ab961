"""Llama 3's tokenizer, written out: byte-level BPE over tiktoken's rank file.

Llama 2 used SentencePiece (32,000 pieces, text split at spaces marked '▁', bytes as a fallback).
Llama 3 uses OpenAI's tiktoken scheme with 128,000 byte sequences plus 256 special tokens:

1. **pre-tokenize**: a regex cuts the text into "words" (:data:`PAT_STR`): contractions ('s, 't,
   're, ...), a run of letters with at most one non-letter, non-digit in front (so " the" and
   ".NET" stay whole), numbers in groups of up to three digits, punctuation runs (with the
   newlines after them), newlines (with the spaces before them), and spaces;
2. **merge**: each word becomes its UTF-8 bytes, then the adjacent pair whose concatenation has
   the lowest rank in the vocabulary is merged, again and again, until no adjacent pair is a
   token (:func:`bpe_merge`). A token's rank is its id;
3. special tokens (``<|begin_of_text|>`` = 128000 ... ``<|reserved_special_token_246|>`` =
   128255) are never produced by merging: they are only recognised in text when asked
   (``allowed_special``), or written by the chat template.

Python's ``re`` has no ``\\p{L}`` / ``\\p{N}`` (Unicode letter / number). The ``regex`` package does,
but no runtime dependency of this package brings it in, so :func:`unicode_class` builds the two
classes from ``unicodedata`` (every code point whose general category starts with L, or N) as
explicit ranges, once. ``\\s`` is written out as Unicode's White_Space set, which is what tiktoken's
and tokenizers' regex engines use (Python's ``\\s`` also matches the separators U+001C..U+001F).
Characters assigned in Unicode versions newer than Python's ``unicodedata`` are neither letters
nor numbers here.

The class shares :class:`~llama_edu.tokenizer.LlamaTokenizerBase`'s API with the Llama 2
tokenizers: ``__call__`` with padding, truncation and tensors, ``encode``, ``decode``,
``batch_decode``, ``pad``, special tokens, ``save_pretrained`` / ``from_pretrained``.
Two differences: special-token text inside ordinary text stays text unless ``allowed_special``
(or ``split_special_tokens=False``) says otherwise, and ``decode`` never "cleans up" spaces
(Llama 3's Hugging Face config asks for that cleanup, which turns ``"a ."`` into ``"a."``; byte-level
BPE decodes exactly, so we do not read that setting from a config).
"""

from __future__ import annotations

import base64
import os
import re
import unicodedata
from functools import cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..io.files import looks_like_repo_id, read_json_object, resolve_file
from .base import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, VOCAB_FILE, LlamaTokenizerBase
from .encoding import BatchEncoding

#: Meta's pre-tokenizer pattern (llama3/tokenizer.py and tokenizer.json's Split regex), as written
#: for engines with Unicode properties. :func:`pretokenize_regex` spells it for Python's ``re``.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Unicode White_Space (what ``\s`` means to tiktoken's and tokenizers' regex engines).
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

NUM_BASE_TOKENS = 128_000
NUM_SPECIAL_TOKENS = 256
#: The named special tokens of Llama 3.1 / 3.2, ids 128000..128010; the rest are reserved.
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]  # fmt: skip
SPECIAL_TOKENS = NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
]

#: The date Llama 3.1's chat template writes when none is given.
DEFAULT_DATE_STRING = "26 Jul 2024"


# ----------------------------------------------------------------------------------------------
# Pre-tokenization: the regex, with \p{L} and \p{N} spelled out
# ----------------------------------------------------------------------------------------------
@cache
def unicode_class(major: str) -> str:
    """The body of a ``re`` character class for every code point whose Unicode general category
    starts with ``major`` ("L" for letters, "N" for numbers), as ranges: ``"A-Za-z\\xaa..."``."""
    parts, start = [], None
    for cp in range(0x110001):
        inside = cp < 0x110000 and unicodedata.category(chr(cp))[0] == major
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            a, b = re.escape(chr(start)), re.escape(chr(cp - 1))
            parts.append(a if start == cp - 1 else f"{a}-{b}")
            start = None
    return "".join(parts)


@cache
def pretokenize_regex() -> re.Pattern:
    """:data:`PAT_STR` for Python's ``re``: the same seven alternatives, tried left to right."""
    L, N, S = unicode_class("L"), unicode_class("N"), WHITE_SPACE
    return re.compile(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # contractions, any case
        rf"|[^\r\n{L}{N}]?[{L}]+"  # a word: letters, with one leading space/punctuation mark
        rf"|[{N}]{{1,3}}"  # numbers, in groups of at most three digits
        rf"| ?[^{S}{L}{N}]+[\r\n]*"  # punctuation (with a space before, newlines after)
        rf"|[{S}]*[\r\n]+"  # newlines, with the spaces before them
        rf"|[{S}]+(?![^{S}])"  # spaces not followed by a word (the last one goes with the word)
        rf"|[{S}]+"
    )


def pretokenize(text: str) -> list[str]:
    """Split text into the words BPE works on: ``"Hello world!"`` -> ``['Hello', ' world', '!']``."""
    return pretokenize_regex().findall(text)


# ----------------------------------------------------------------------------------------------
# Byte-level BPE by rank
# ----------------------------------------------------------------------------------------------
def bpe_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """The token ids of one pre-tokenized word (its UTF-8 bytes), as tiktoken computes them.

    Start from single bytes; repeatedly merge the adjacent pair whose concatenation has the
    lowest rank (the leftmost if the same pair occurs twice), re-scanning after every merge,
    until no adjacent pair forms a token. Every single byte is a token, so this always ends.
    """
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, best_rank = -1, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return [ranks[p] for p in parts]


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (0x20 ' ' -> 'Ġ', 0x0A -> 'Ċ'), the alphabet in
    which Hugging Face's tokenizer.json writes byte-level tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken rank file (one ``base64(token bytes) rank`` per line)."""
    data = Path(path).read_bytes()
    if data[:1] == b"\n" or b"\x00" in data[:64]:  # a SentencePiece model is a protobuf: field 1 = 0x0a
        raise ValueError(
            f"{path} is not a tiktoken rank file (it looks binary: a Llama 2 SentencePiece model?); "
            "Llama3Tokenizer needs Meta's Llama 3 tokenizer.model ('base64 rank' lines)"
        )
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}, line {n}: expected 'base64 rank', got {line[:60]!r}; is it a Llama 3 tokenizer.model?") from None
    _check_ranks(ranks, str(path))
    return ranks


def ranks_from_tokenizer_json(path: str | os.PathLike) -> dict[bytes, int]:
    """The rank table of a Hugging Face byte-level BPE ``tokenizer.json`` (its vocab, with GPT-2's
    byte alphabet undone). For tiktoken-made vocabularies such as Llama 3's, ids are ranks."""
    data = read_json_object(path, "it should be a Hugging Face tokenizer.json")
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path} does not hold a BPE model with a vocab; is it Llama 3's tokenizer.json?")
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    try:
        ranks = {bytes(decoder[c] for c in tok): int(i) for tok, i in model["vocab"].items()}
    except KeyError:
        raise ValueError(f"{path} is not a byte-level BPE vocabulary (a token has characters outside GPT-2's byte alphabet)") from None
    _check_ranks(ranks, str(path))
    return ranks


def _check_ranks(ranks: dict[bytes, int], where: str) -> None:
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{where}: the ranks are not 0..{len(ranks) - 1} without gaps; the file is damaged")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{where}: {len(missing)} single bytes are not tokens (e.g. {missing[0]:#04x}), so some text cannot be encoded")


# ----------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------
class Llama3Tokenizer(LlamaTokenizerBase):
    """Meta's Llama 3 tokenizer (128,000 BPE tokens + 256 special tokens = 128,256 ids).

    >>> tok = Llama3Tokenizer(find_data_file("llama3/tokenizer.model"))
    >>> tok("Hello world!").input_ids
    [128000, 9906, 1917, 0]

    ``vocab_file`` is Meta's ``tokenizer.model`` (tiktoken's rank format); a Hugging Face
    ``tokenizer_file`` (``tokenizer.json``) works too. ``allowed_special`` ("all", or a set of
    special-token strings) lets those strings in the text become their special tokens; by
    default they are encoded as the text they are.
    """

    _config_class_name = "Llama3Tokenizer"
    _can_load_tokenizer_json = True

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        tokenizer_file: str | os.PathLike | None = None,
        bos_token: Any = "<|begin_of_text|>",
        eos_token: Any = "<|end_of_text|>",
        pad_token: Any = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        padding_side: str | None = None,
        truncation_side: str | None = None,
        model_max_length: int | None = None,
        split_special_tokens: bool = True,
        additional_special_tokens: Sequence[Any] | None = None,
        added_tokens_decoder: dict | None = None,
        chat_template: str | None = None,
        name_or_path: str = "",
        cache_size: int = 50_000,
    ) -> None:
        if vocab_file is not None:
            self.ranks = load_tiktoken_ranks(_existing(vocab_file, "vocab_file"))
        elif tokenizer_file is not None:
            self.ranks = ranks_from_tokenizer_json(_existing(tokenizer_file, "tokenizer_file"))
        else:
            raise ValueError(
                "Llama3Tokenizer needs vocab_file (Meta's tokenizer.model, e.g. "
                "llama_edu.files.find_data_file('llama3/tokenizer.model')) or tokenizer_file (tokenizer.json)"
            )
        self.tokenizer_file = str(tokenizer_file) if tokenizer_file is not None else None
        self._decoder = {rank: token for token, rank in self.ranks.items()}
        self._byte_chars = bytes_to_unicode()
        self._char_bytes = {c: b for b, c in self._byte_chars.items()}
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_size = cache_size
        self._special_res: dict[frozenset, re.Pattern] = {}
        n = len(self.ranks)
        specials = {str(n + i): t for i, t in enumerate(SPECIAL_TOKENS)} if n == NUM_BASE_TOKENS else {}
        specials.update({str(k): v for k, v in (added_tokens_decoder or {}).items()})
        super().__init__(
            vocab_file=vocab_file, unk_token=None, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
            add_bos_token=add_bos_token, add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces, legacy=False, padding_side=padding_side,
            truncation_side=truncation_side, model_max_length=model_max_length,
            split_special_tokens=split_special_tokens, additional_special_tokens=additional_special_tokens,
            added_tokens_decoder=specials, chat_template=chat_template, name_or_path=name_or_path,
        )  # fmt: skip

    # --- the backend hooks of LlamaTokenizerBase ---------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of BPE tokens (128,000 for Llama 3), without the special tokens after them."""
        return len(self.ranks)

    def _piece_to_id(self, piece: str) -> int | None:
        try:
            return self.ranks.get(bytes(self._char_bytes[c] for c in piece))
        except KeyError:
            return None

    def _id_to_piece(self, index: int) -> str:
        """A token as tokenizer.json writes it: its bytes in GPT-2's alphabet (' world' -> 'Ġworld')."""
        return "".join(self._byte_chars[b] for b in self._decoder[index])

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = b"".join(
            t.encode() if t in self._added_tokens_encoder else bytes(self._char_bytes[c] for c in t) for t in tokens
        )
        return data.decode("utf-8", errors="replace")

    def _encode_texts(self, texts: list[str], split_special_tokens: Any, prefix: bool = True) -> list[list[int]]:
        """``split_special_tokens``: True -> special-token text is text; False -> every special
        token is recognised; a frozenset -> only those (how ``allowed_special`` arrives here)."""
        if split_special_tokens is True:
            return [self.encode_ordinary(t) for t in texts]
        allowed = frozenset(self._added_tokens_encoder) if split_special_tokens is False else split_special_tokens
        pattern = self._special_re(allowed)
        out = []
        for text in texts:
            ids, start = [], 0
            for m in pattern.finditer(text):
                ids += self.encode_ordinary(text[start : m.start()])
                ids.append(self._added_tokens_encoder[m.group()])
                start = m.end()
            out.append(ids + self.encode_ordinary(text[start:]))
        return out

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        data = bytearray()
        for i in ids:
            token = self._decoder.get(i)
            if token is not None:
                data += token
            elif not skip_special_tokens:
                data += self._added_tokens_decoder[i].encode()
        return data.decode("utf-8", errors="replace")

    def _special_re(self, allowed: frozenset) -> re.Pattern:
        if allowed not in self._special_res:
            tokens = sorted(allowed, key=len, reverse=True)
            self._special_res[allowed] = re.compile("|".join(map(re.escape, tokens)) if tokens else "(?!)")
        return self._special_res[allowed]

    def _on_tokens_changed(self) -> None:
        super()._on_tokens_changed()
        self._special_res = {}

    # --- text -> ids ---------------------------------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of plain text: no special tokens recognised, no BOS. Words seen before come from
        a cache (text is Zipfian: most words repeat)."""
        ids: list[int] = []
        cache = self._cache
        for word in pretokenize_regex().findall(text):
            hit = cache.get(word)
            if hit is None:
                raw = word.encode("utf-8")
                rank = self.ranks.get(raw)  # a whole word that is a token needs no merging
                hit = (rank,) if rank is not None else tuple(bpe_merge(raw, self.ranks))
                if len(cache) >= self._cache_size:
                    cache.clear()
                cache[word] = hit
            ids.extend(hit)
        return ids

    def _allowed(self, allowed_special: Any) -> Any:
        """``allowed_special`` ("all", a set of strings, or None) as the value _encode_texts takes."""
        if allowed_special is None:
            return None
        if allowed_special == "all":
            return False
        if isinstance(allowed_special, str) or not isinstance(allowed_special, Iterable):
            raise ValueError(f"allowed_special must be 'all' or a set of special-token strings, got {allowed_special!r}")
        allowed = frozenset(allowed_special)
        unknown = sorted(allowed - set(self._added_tokens_encoder))
        if unknown:
            raise ValueError(f"allowed_special names {unknown}, which are not special tokens of this tokenizer (e.g. '<|eot_id|>')")
        return allowed

    def __call__(self, text: Any, text_pair: Any = None, *args: Any, allowed_special: Any = None, **kwargs: Any) -> BatchEncoding:
        """As :meth:`LlamaTokenizerBase.__call__`; ``allowed_special="all"`` (or a set such as
        ``{"<|eot_id|>"}``) turns those special-token strings in the text into their ids."""
        allowed = self._allowed(allowed_special)
        if allowed is not None:
            if kwargs.get("split_special_tokens") is not None:
                raise ValueError("give allowed_special or split_special_tokens, not both")
            kwargs["split_special_tokens"] = allowed
        return super().__call__(text, text_pair, *args, **kwargs)

    def tokenize(self, text: str, split_special_tokens: bool | None = None, allowed_special: Any = None, **kwargs: Any) -> list[str]:
        allowed = self._allowed(allowed_special)
        return super().tokenize(text, split_special_tokens if allowed is None else allowed, **kwargs)

    # --- chat ------------------------------------------------------------------------------------
    @property
    def default_chat_template(self) -> str:  # type: ignore[override]
        raise AttributeError("Llama3Tokenizer renders Llama 3.1's chat format in Python; see apply_chat_template")

    def render_chat(
        self, conversation: list[dict[str, str]], add_generation_prompt: bool = False, date_string: str = DEFAULT_DATE_STRING
    ) -> list[tuple[str, bool]]:
        """Llama 3.1's chat format as pieces ``(text, is_message_content)``, exactly as Meta's
        published Jinja template (tokenizer_config.json of Llama-3.1-8B-Instruct) renders a
        conversation without tools::

            <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n
            Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n{system}<|eot_id|>
            <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
            <|start_header_id|>assistant<|end_header_id|>\\n\\n        (the generation prompt)

        The system header is always written (with an empty system message when there is none),
        and every message is stripped of surrounding whitespace, as the template does.
        """
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError("apply_chat_template needs a non-empty list of {'role': ..., 'content': ...} messages")
        for m in conversation:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"each message must be a dict with string 'role' and 'content', got {m!r}")
            if m["role"] in ("tool", "ipython") or "tool_calls" in m:
                raise ValueError(f"tool messages are not supported by this renderer (message {m!r}); use the Jinja template")
            if "<|" in m["role"] or "\n" in m["role"]:
                raise ValueError(f"a role must be a plain name like 'user', got {m['role']!r}")
        messages = list(conversation)
        system = ""
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        header = "Cutting Knowledge Date: December 2023\nToday Date: " + date_string + "\n\n"
        pieces = [(self.bos_token or "", False),
                  ("<|start_header_id|>system<|end_header_id|>\n\n" + header, False), (system, True), ("<|eot_id|>", False)]  # fmt: skip
        for m in messages:
            pieces += [(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False), (m["content"].strip(), True),
                       ("<|eot_id|>", False)]  # fmt: skip
        if add_generation_prompt:
            pieces.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
        return pieces

    def apply_chat_template(  # type: ignore[override]
        self,
        conversation: list[dict[str, str]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        date_string: str = DEFAULT_DATE_STRING,
    ) -> str | list[int] | torch.Tensor:
        """A conversation in Llama 3.1's chat format (:meth:`render_chat`): the string
        (``tokenize=False``) or its ids. ``add_generation_prompt=True`` ends with the assistant's
        header, so the model writes the answer next.

        Only the template makes control tokens: a ``<|eot_id|>`` typed inside a message is
        encoded as the text it is. Each piece of template text ends at a special token or at
        the ``\\n\\n`` after a header, both of which end a pre-tokenized word, so encoding the
        pieces one by one gives the ids of the whole string. A ``chat_template`` (argument or
        attribute) is rendered with Jinja instead, as the Llama 2 tokenizers do.
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is not None:
            pieces = self._render_jinja(template, list(conversation), add_generation_prompt)
        else:
            pieces = self.render_chat(conversation, add_generation_prompt, date_string)
        if not tokenize:
            return "".join(text for text, _ in pieces)
        ids: list[int] = []
        for text, is_content in pieces:
            ids += self._encode_texts([text], is_content)[0]  # content: special-token text is text
        return self._finish_ids(ids, padding, truncation, max_length, return_tensors)

    # --- saving and loading ----------------------------------------------------------------------
    def tiktoken_bytes(self) -> bytes:
        """The rank table in tiktoken's format (Meta's ``tokenizer.model``), byte for byte."""
        return b"".join(base64.b64encode(tok) + b" %d\n" % rank for tok, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]))

    def _serialized_model(self) -> bytes:
        return self.tiktoken_bytes()

    def _config(self) -> dict:
        config = super()._config()
        for key in ("legacy", "sp_model_kwargs", "use_default_system_prompt", "spaces_between_special_tokens", "unk_token"):
            config.pop(key, None)
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                        revision: str | None = None, token: str | bool | None = None, local_files_only: bool = False,
                        **kwargs: Any) -> "Llama3Tokenizer":  # fmt: skip
        """Load from a folder holding Meta's ``tokenizer.model`` or a Hugging Face
        ``tokenizer.json`` (with ``tokenizer_config.json`` when present), a ``tokenizer.model``
        file, or a hub repo id such as ``"meta-llama/Llama-3.2-1B"`` (its ``tokenizer.json``).
        ``kwargs`` override the saved configuration, e.g. ``pad_token="<|finetune_right_pad_id|>"``.

        Of a saved configuration, ``clean_up_tokenization_spaces`` is not read (see the module
        docstring); the ``tokenizer.json``'s merges are not needed: ranks are the merge order.
        """
        name = os.fspath(pretrained_model_name_or_path)
        path = Path(name).expanduser()
        if not path.exists() and looks_like_repo_id(name):
            # Hub repos of Llama 3 keep tokenizer.json at the top (Meta's file is in original/).
            hub = dict(cache_dir=cache_dir, revision=revision, token=token, local_files_only=local_files_only)
            resolve_file(name, TOKENIZER_CONFIG_FILE, missing_ok=True, **hub)
            path = resolve_file(name, TOKENIZER_FILE, **hub).parent  # type: ignore[union-attr]
        if path.is_dir() and not any((path / f).is_file() for f in (VOCAB_FILE, TOKENIZER_FILE)):
            raise FileNotFoundError(f"{path} has neither {VOCAB_FILE} (Meta's Llama 3 tokenizer) nor {TOKENIZER_FILE}")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("split_special_tokens", True)
        return super().from_pretrained.__func__(cls, path, **kwargs)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return (
            f"Llama3Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, len={len(self)}, "
            f"padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})"
        )


def _existing(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"{what} {p} does not exist; pass Meta's Llama 3 tokenizer.model "
            "(llama_edu.files.find_data_file('llama3/tokenizer.model')) or a tokenizer.json"
        )
    return p
