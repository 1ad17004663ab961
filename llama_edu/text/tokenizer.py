"""Llama 2's tokenizer: ``LlamaTokenizer`` (sentencepiece) and ``LlamaTokenizerFast`` (tokenizers).

Both behave as Hugging Face transformers 4.37.2's classes of the same names: same constructor
arguments and defaults, same ids, same decoded text, same padding/truncation, same chat
template. They share everything except the two backend steps, which live in the subclasses:

* text segment -> ids (``_encode_texts``): sentencepiece's ``encode`` or the ``tokenizers`` BPE;
* ids -> text (``_decode_ids``).

Everything else (special tokens, added tokens such as a pad token, ``__call__`` with padding,
truncation and tensors, the chat template, saving and loading) is in :class:`LlamaTokenizerBase`.

Two behaviours worth knowing (both explained in notebook 01):

* Special tokens written in the text (``"<s>"``, ``"</s>"``) are recognised as special tokens,
  as transformers does; pass ``split_special_tokens=True`` to treat them as plain text.
* ``legacy``: SentencePiece adds a space (``▁``) in front of every piece of text it encodes.
  With ``legacy=True`` (the old behaviour, and the default, with a warning, when ``legacy`` is
  not given) the text right after a special token gets that space too: ``"<s>Hello"`` ->
  ``<s>``, ``▁Hello``. With ``legacy=False`` only the very start of the text gets it:
  ``"<s>Hello"`` -> ``<s>``, ``Hello``; ``"<s> Hello"`` -> ``<s>``, ``▁Hello``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..io.atomic_save import replace_folder_files
from ..text.bpe import BYTE, CONTROL, SPIECE_UNDERLINE, UNKNOWN, set_add_dummy_prefix
from ..io.files import atomic_write_bytes, looks_like_repo_id, read_json_object, resolve_file

_RESAVE = "re-save the tokenizer or delete that file"

VOCAB_FILE = "tokenizer.model"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

#: transformers' stand-in for "no limit" on model_max_length.
VERY_LARGE_INTEGER = int(1e30)

# Meta's chat format (llama/generation.py): [INST] user [/INST] answer, with the system prompt
# folded into the first user message between <<SYS>> markers.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

#: The default system prompt of Llama 2 chat (transformers' DEFAULT_SYSTEM_PROMPT).
DEFAULT_SYSTEM_PROMPT = """You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. Your \
answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure\
 that your responses are socially unbiased and positive in nature.

If a question does not make any sense, or is not factually coherent, explain why instead of answering something not \
correct. If you don't know the answer to a question, please don't share false information."""

SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "pad_token")

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

_LEGACY_WARNED: set[str] = set()


def _warn_legacy_once(cls_name: str) -> None:
    if cls_name not in _LEGACY_WARNED:
        _LEGACY_WARNED.add(cls_name)
        warnings.warn(
            f"You are using the default legacy behaviour of {cls_name} (legacy=None behaves as legacy=True, "
            "as in transformers): text right after a special token gets a leading '▁'. Pass legacy=True to "
            "keep it without this warning, or legacy=False for the fixed behaviour.",
            UserWarning,
            stacklevel=3,
        )


def _token_str(token: Any) -> str | None:
    """A special token given as a str, an AddedToken-like object (.content) or a config dict."""
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict) and "content" in token:
        return token["content"]
    if hasattr(token, "content"):
        return str(token.content)
    raise TypeError(f"a special token must be a string, got {type(token).__name__} {token!r}")


class BatchEncoding(dict):
    """The output of a tokenizer call: a dict (``input_ids``, ``attention_mask``, ...) with
    attribute access (``enc.input_ids``) and ``.to(device)`` for its tensors."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {name!r}; it has {list(self.keys())}") from None

    def to(self, device: str | torch.device) -> "BatchEncoding":
        """Move every tensor to ``device`` (in place, like transformers); returns self."""
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                self[k] = v.to(device)
        return self

    def __getstate__(self) -> dict:
        return dict(self)

    def __setstate__(self, state: dict) -> None:
        self.update(state)


# ----------------------------------------------------------------------------------------------
# The shared base class
# ----------------------------------------------------------------------------------------------


class LlamaTokenizerBase:
    """Everything the slow and fast Llama tokenizers share. Subclasses supply the backend:

    ``vocab_size``, ``_piece_to_id``, ``_id_to_piece``, ``_encode_texts``, ``_decode_ids``,
    ``convert_tokens_to_string``, and optionally ``_on_tokens_changed`` / ``_save_backend``.
    """

    padding_side: str = "right"
    truncation_side: str = "right"
    model_input_names = ["input_ids", "attention_mask"]
    _config_class_name = "LlamaTokenizer"

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        unk_token: Any = "<unk>",
        bos_token: Any = "<s>",
        eos_token: Any = "</s>",
        pad_token: Any = None,
        sp_model_kwargs: dict | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        use_default_system_prompt: bool = False,
        spaces_between_special_tokens: bool = False,
        legacy: bool | None = None,
        padding_side: str | None = None,
        truncation_side: str | None = None,
        model_max_length: int | None = None,
        split_special_tokens: bool = False,
        additional_special_tokens: Sequence[Any] | None = None,
        added_tokens_decoder: dict | None = None,
        chat_template: str | None = None,
        name_or_path: str = "",
    ) -> None:
        if legacy is None:
            _warn_legacy_once(type(self).__name__)
            legacy = True
        self.legacy = bool(legacy)
        self.vocab_file = str(vocab_file) if vocab_file is not None else None
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.use_default_system_prompt = use_default_system_prompt
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.split_special_tokens = split_special_tokens
        self.chat_template = chat_template
        self.name_or_path = name_or_path
        self.model_max_length = VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)
        if padding_side is not None:
            self.padding_side = padding_side
        if truncation_side is not None:
            self.truncation_side = truncation_side
        for side, value in (("padding_side", self.padding_side), ("truncation_side", self.truncation_side)):
            if value not in ("left", "right"):
                raise ValueError(f"{side} must be 'left' or 'right', got {value!r}")

        # Added tokens: special tokens (ids of the sentencepiece vocabulary, e.g. <s> = 1) and new
        # tokens appended after it (e.g. a <pad> at id 32000). transformers calls these "added tokens".
        self._added_tokens_encoder: dict[str, int] = {}
        self._added_tokens_decoder: dict[int, str] = {}
        self._special: dict[str, str | None] = dict.fromkeys(SPECIAL_TOKENS_ATTRIBUTES)
        self._additional_special_tokens: list[str] = []
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
        self._split_re: re.Pattern | None = None

        for id_str, tok in sorted((added_tokens_decoder or {}).items(), key=lambda kv: int(kv[0])):
            self._add_token(_token_str(tok), expected_id=int(id_str))  # type: ignore[arg-type]
        for name, tok in zip(SPECIAL_TOKENS_ATTRIBUTES, (bos_token, eos_token, unk_token, pad_token)):
            tok = _token_str(tok)
            if tok is not None:
                self._add_token(tok)
            self._special[name] = tok
        for tok in additional_special_tokens or []:
            tok = _token_str(tok)
            self._add_token(tok)  # type: ignore[arg-type]
            if tok not in self._additional_special_tokens:
                self._additional_special_tokens.append(tok)  # type: ignore[arg-type]
        self._on_tokens_changed()

    # --- backend hooks --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the base (sentencepiece) vocabulary, without tokens added after it."""
        raise NotImplementedError

    def _piece_to_id(self, piece: str) -> int | None:
        """Id of a piece of the base vocabulary, or None when it is not one."""
        raise NotImplementedError

    def _id_to_piece(self, index: int) -> str:
        raise NotImplementedError

    def _encode_texts(self, texts: list[str], split_special_tokens: bool, prefix: bool = True) -> list[list[int]]:
        """Token ids of each text, special tokens in the text recognised, no BOS/EOS added.
        ``prefix=False`` (matters for legacy=False only): the texts continue right after a
        special token, so they get no leading '▁'."""
        raise NotImplementedError

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join tokens (pieces) back into text."""
        raise NotImplementedError

    def _on_tokens_changed(self) -> None:
        """Called after special or added tokens or add_bos/eos_token changed."""
        self._split_re = None

    def _save_backend(self, directory: Path) -> list[Path]:
        return []

    # --- special tokens -------------------------------------------------------------------------

    def _add_token(self, token: str, expected_id: int | None = None) -> int:
        """Register ``token`` as an added (special) token; append it after the vocabulary if new."""
        if not isinstance(token, str) or not token:
            raise ValueError(f"a special token must be a non-empty string, got {token!r}")
        if token in self._added_tokens_encoder:
            return self._added_tokens_encoder[token]
        index = self._piece_to_id(token)
        if index is None:
            index = len(self)
            if expected_id is not None and expected_id != index:
                raise ValueError(
                    f"added token {token!r} should have id {expected_id}, but the next free id is {index}; "
                    "the added_tokens_decoder of the tokenizer config does not fit this vocabulary"
                )
            self._added_tokens_decoder[index] = token
            self._added_tokens_encoder[token] = index
            self._on_new_token(token, index)
        else:
            self._added_tokens_decoder[index] = token
            self._added_tokens_encoder[token] = index
        return index

    def _on_new_token(self, token: str, index: int) -> None:
        """Backend hook: a token was appended after the vocabulary with id ``index``."""

    def add_special_tokens(self, special_tokens_dict: dict[str, Any], replace_additional_special_tokens: bool = True) -> int:
        """Set special tokens, adding the ones not in the vocabulary after it.

        ``tok.add_special_tokens({"pad_token": "<pad>"})`` gives Llama a pad token with id
        ``len(tok)`` (32000 for Meta's vocabulary); ``len(tok)`` grows by one, so resize the
        model's embeddings to match: ``model.resize_token_embeddings(len(tok))``.
        Returns the number of tokens added to the vocabulary.
        """
        before = len(self)
        for key, value in special_tokens_dict.items():
            if key == "additional_special_tokens":
                tokens = [_token_str(t) for t in value]
                for t in tokens:
                    self._add_token(t)  # type: ignore[arg-type]
                if replace_additional_special_tokens:
                    self._additional_special_tokens = []
                self._additional_special_tokens += [t for t in tokens if t not in self._additional_special_tokens]  # type: ignore[misc]
            elif key in SPECIAL_TOKENS_ATTRIBUTES:
                token = _token_str(value)
                if token is not None:
                    self._add_token(token)
                self._special[key] = token
            else:
                raise ValueError(
                    f"unknown special token key {key!r}; use one of {list(SPECIAL_TOKENS_ATTRIBUTES)} "
                    "or 'additional_special_tokens'"
                )
        self._on_tokens_changed()
        return len(self) - before

    def _set_special(self, name: str, value: Any) -> None:
        token = _token_str(value)
        if token is not None and token not in self._added_tokens_encoder:
            if self._piece_to_id(token) is None:
                raise ValueError(
                    f"{token!r} is not in the vocabulary, so it cannot be the {name}; add it with "
                    f"tokenizer.add_special_tokens({{{name!r}: {token!r}}}) (then resize the model's embeddings), "
                    f"or use an existing token, e.g. tokenizer.{name} = tokenizer.eos_token"
                )
            self._add_token(token)
        self._special[name] = token
        self._on_tokens_changed()

    bos_token = property(lambda self: self._special["bos_token"], lambda self, v: self._set_special("bos_token", v))
    eos_token = property(lambda self: self._special["eos_token"], lambda self, v: self._set_special("eos_token", v))
    unk_token = property(lambda self: self._special["unk_token"], lambda self, v: self._set_special("unk_token", v))
    pad_token = property(lambda self: self._special["pad_token"], lambda self, v: self._set_special("pad_token", v))

    def _token_id(self, name: str) -> int | None:
        token = self._special[name]
        return None if token is None else self.convert_tokens_to_ids(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._token_id("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    @property
    def additional_special_tokens(self) -> list[str]:
        return list(self._additional_special_tokens)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in self._special.items() if v is not None}
        if self._additional_special_tokens:
            out["additional_special_tokens"] = list(self._additional_special_tokens)
        return out

    @property
    def all_special_tokens(self) -> list[str]:
        """bos, eos, unk, pad (when set) and the additional special tokens, without repeats."""
        out: list[str] = []
        for t in [*(self._special[k] for k in SPECIAL_TOKENS_ATTRIBUTES), *self._additional_special_tokens]:
            if t is not None and t not in out:
                out.append(t)
        return out

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return dict(self._added_tokens_encoder)

    @property
    def added_tokens_decoder(self) -> dict[int, str]:
        return dict(sorted(self._added_tokens_decoder.items()))

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos_token = bool(value)
        self._on_tokens_changed()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos_token = bool(value)
        self._on_tokens_changed()

    def _special_split_re(self) -> re.Pattern:
        """A regex matching any added token, longest first (the leftmost, longest match wins)."""
        if self._split_re is None:
            tokens = sorted(self._added_tokens_encoder, key=len, reverse=True)
            self._split_re = re.compile("|".join(map(re.escape, tokens)) if tokens else "(?!)")
        return self._split_re

    # --- vocabulary -----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Full vocabulary size: the base vocabulary plus the tokens appended after it."""
        return self.vocab_size + sum(1 for i in self._added_tokens_decoder if i >= self.vocab_size)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Token(s) -> id(s); a string not in the vocabulary gives the unk id, as in transformers."""
        if isinstance(tokens, str):
            if tokens in self._added_tokens_encoder:
                return self._added_tokens_encoder[tokens]
            index = self._piece_to_id(tokens)
            if index is None:
                unk = self._special["unk_token"]
                return self._added_tokens_encoder.get(unk, 0) if unk is not None else 0
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]  # type: ignore[misc]

    def _check_ids(self, ids: list[int]) -> None:
        n = len(self)
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(
                    f"token id {i} is out of range: this tokenizer has {n} tokens (ids 0..{n - 1}); "
                    "were the ids made by another tokenizer, or should the model's vocab_size match len(tokenizer)?"
                )

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str | list[str]:
        """Id(s) -> token(s) (pieces such as '▁Hello' or '<0x0A>')."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            self._check_ids([ids])
            return self._added_tokens_decoder.get(ids) or self._id_to_piece(ids)
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._added_tokens_decoder.get(i) or self._id_to_piece(i) for i in ids if i not in special]

    # --- special tokens around sequences ----------------------------------------------------------

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        """``<s> A`` (``</s>`` too when add_eos_token); a pair is ``<s> A <s> B``."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            output += bos + list(token_ids_1) + eos
        return output  # type: ignore[return-value]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return (int(self.add_bos_token) + int(self.add_eos_token)) * (2 if pair else 1)

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        """1 where build_inputs_with_special_tokens puts a special token, 0 on the sequence tokens.

        With ``already_has_special_tokens=True``: 1 for every special id in ``token_ids_0``.
        """
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("give one list of ids when already_has_special_tokens=True")
            special = set(self.all_special_ids)
            return [1 if i in special else 0 for i in token_ids_0]
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """0 for every position of the first sequence (with its special tokens), 1 for the second."""
        n_special = int(self.add_bos_token) + int(self.add_eos_token)
        output = [0] * (len(token_ids_0) + n_special)
        if token_ids_1 is not None:
            output += [1] * (len(token_ids_1) + n_special)
        return output

    # --- text -> ids ------------------------------------------------------------------------------

    def _legacy_false_prefix(self, texts: list[str], split_special_tokens: bool, prefix: bool = True) -> list[str]:
        """legacy=False: one '▁' in front of the whole text, none after special tokens.

        transformers encodes ``"▁" + text`` and drops that '▁' again when the text starts with a
        special token; both backends reach the same ids by prefixing only texts that do not.
        """
        out = []
        for t in texts:
            if not t:
                out.append(t)
                continue
            t = t.replace(SPIECE_UNDERLINE, " ")  # as transformers: a literal '▁' is read as a space
            starts_special = not split_special_tokens and self._special_split_re().match(t) is not None
            out.append(t if starts_special or not prefix else SPIECE_UNDERLINE + t)
        return out

    def tokenize(self, text: str, split_special_tokens: bool | None = None, **kwargs: Any) -> list[str]:
        """Text -> tokens (pieces), without BOS/EOS: "Hello world" -> ['▁Hello', '▁world']."""
        _no_kwargs("tokenize", kwargs)
        if not isinstance(text, str):
            raise TypeError(f"tokenize takes a string, got {type(text).__name__}")
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        return self.convert_ids_to_tokens(self._encode_texts([text], split)[0])  # type: ignore[return-value]

    def encode(
        self,
        text: str,
        text_pair: str | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> list[int] | torch.Tensor:
        """One text -> list of ids (BOS first by default); ``return_tensors='pt'`` -> shape (1, seq)."""
        if not isinstance(text, str):
            raise TypeError(
                f"encode takes one string, got {type(text).__name__}; call the tokenizer itself, "
                "tokenizer(list_of_texts), to encode a batch"
            )
        enc = self(text, text_pair, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                   max_length=max_length, return_tensors=return_tensors, **kwargs)  # fmt: skip
        return enc["input_ids"]

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        return_token_type_ids: bool | None = None,
        return_special_tokens_mask: bool = False,
        return_length: bool = False,
        split_special_tokens: bool | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Encode a text or a batch of texts (optionally paired) into a :class:`BatchEncoding`.

        ``input_ids`` and ``attention_mask`` are lists (one text) or lists of lists (a batch),
        or ``torch.long`` tensors of shape (batch, seq) with ``return_tensors='pt'``.
        ``padding``: False, True/'longest' (to the longest in the batch) or 'max_length'; pads on
        ``self.padding_side`` with the pad token (Llama has none by default: set one first).
        ``truncation``: True/'longest_first', 'only_first', 'only_second'; cut to ``max_length``
        on ``self.truncation_side``, keeping room for BOS/EOS.
        """
        _no_kwargs("__call__", kwargs)
        batched = isinstance(text, (list, tuple))
        texts = _as_text_list(text, "text")
        pairs = _as_text_list(text_pair, "text_pair") if text_pair is not None else None
        if pairs is not None and (isinstance(text_pair, (list, tuple)) != batched or len(pairs) != len(texts)):
            raise ValueError(
                f"text and text_pair must both be strings or both be lists of the same length, got "
                f"{len(texts)} texts and {len(pairs)} pairs"
            )
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        padding_strategy, truncation_strategy, max_length = self._padding_truncation_strategies(
            padding, truncation, max_length, pairs is not None
        )

        ids_a = self._encode_texts(texts, split)
        ids_b = self._encode_texts(pairs, split) if pairs is not None else [None] * len(texts)
        rows: list[dict[str, list[int]]] = []
        for a, b in zip(ids_a, ids_b):
            if truncation_strategy is not None and max_length is not None:
                n_special = self.num_special_tokens_to_add(b is not None) if add_special_tokens else 0
                a, b = self._truncate(a, b, len(a) + (len(b) if b is not None else 0) + n_special - max_length,
                                      truncation_strategy)  # fmt: skip
            if add_special_tokens:
                row = {"input_ids": self.build_inputs_with_special_tokens(a, b)}
                if return_token_type_ids:
                    row["token_type_ids"] = self.create_token_type_ids_from_sequences(a, b)
                if return_special_tokens_mask:
                    row["special_tokens_mask"] = self.get_special_tokens_mask(a, b)
            else:
                row = {"input_ids": a + (b or [])}
                if return_token_type_ids:
                    row["token_type_ids"] = [0] * len(a) + [1] * len(b or [])
                if return_special_tokens_mask:
                    row["special_tokens_mask"] = [0] * len(row["input_ids"])
            rows.append(row)

        encoded = {k: [r[k] for r in rows] for k in rows[0]} if rows else {"input_ids": []}
        out = self.pad(
            encoded,
            padding=padding_strategy or False,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            return_attention_mask=return_attention_mask,
            _check_pad_token=False,
        )
        if return_length:
            out["length"] = [len(r) for r in out["input_ids"]]
        if not batched:
            out = BatchEncoding({k: v[0] for k, v in out.items()})
        return _to_tensors(out, return_tensors, prepend_batch_axis=not batched)

    def _padding_truncation_strategies(
        self, padding: bool | str, truncation: bool | str | None, max_length: int | None, is_pair: bool
    ) -> tuple[str | None, str | None, int | None]:
        if padding is True or padding == "longest":
            padding_strategy: str | None = "longest"
        elif padding == "max_length":
            padding_strategy = "max_length"
        elif padding in (False, None, "do_not_pad"):
            padding_strategy = None
        else:
            raise ValueError(f"padding must be True/'longest', 'max_length' or False, got {padding!r}")
        if truncation is None and max_length is not None and padding_strategy is None:
            truncation = "longest_first"  # transformers: max_length alone means truncate
        if truncation is True:
            truncation_strategy: str | None = "longest_first"
        elif truncation in (False, None, "do_not_truncate"):
            truncation_strategy = None
        elif truncation in ("longest_first", "only_first", "only_second"):
            truncation_strategy = truncation  # type: ignore[assignment]
        else:
            raise ValueError(
                f"truncation must be True/'longest_first', 'only_first', 'only_second' or False, got {truncation!r}"
            )
        if truncation_strategy == "only_second" and not is_pair:
            raise ValueError("truncation='only_second' needs a text_pair; use truncation=True for single texts")
        if max_length is None and (truncation_strategy is not None or padding_strategy == "max_length"):
            if self.model_max_length < VERY_LARGE_INTEGER:
                max_length = self.model_max_length
            elif padding_strategy == "max_length":
                raise ValueError("padding='max_length' needs max_length=... (this tokenizer has no model_max_length)")
        if padding_strategy is not None:
            self._require_pad_token()
        return padding_strategy, truncation_strategy, max_length

    def _require_pad_token(self) -> None:
        if self.pad_token is None or self.pad_token_id is None:
            raise ValueError(
                "Asking to pad but the tokenizer has no padding token (Llama 2 was trained without one). "
                "Use an existing token, tokenizer.pad_token = tokenizer.eos_token (or unk_token), or add a "
                "new one with tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's "
                "embeddings with model.resize_token_embeddings(len(tokenizer))."
            )

    def _truncate(self, a: list[int], b: list[int] | None, n_remove: int, strategy: str) -> tuple[list[int], list[int] | None]:
        """Remove ``n_remove`` tokens as transformers' truncate_sequences does (on truncation_side)."""
        if n_remove <= 0:
            return a, b

        def cut(ids: list[int], n: int) -> list[int]:
            if n <= 0:
                return ids
            return ids[:-n] if self.truncation_side == "right" else ids[n:]

        if strategy == "only_first" or (strategy == "longest_first" and b is None):
            if len(a) <= n_remove:  # transformers refuses too (it logs an error and does not truncate)
                raise ValueError(
                    f"cannot truncate to max_length: {n_remove} tokens must go but the first sequence has "
                    f"only {len(a)}; raise max_length (BOS/EOS take {self.num_special_tokens_to_add(b is not None)})"
                    + (" or use truncation='longest_first'" if b is not None else "")
                )
            return cut(a, n_remove), b
        if strategy == "only_second":
            if len(b) <= n_remove:  # type: ignore[arg-type]
                raise ValueError(
                    f"cannot truncate to max_length: {n_remove} tokens must go but the second sequence has "
                    f"only {len(b)}; use truncation='longest_first'"  # type: ignore[arg-type]
                )
            return a, cut(b, n_remove)  # type: ignore[arg-type]
        # longest_first on a pair: first even out the lengths, then take from both alternately.
        if len(a) + len(b) < n_remove:  # type: ignore[arg-type]
            raise ValueError(f"cannot truncate to max_length: {n_remove} tokens must go but the pair has fewer")
        first = min(abs(len(b) - len(a)), n_remove)  # type: ignore[arg-type]
        second = n_remove - first
        if len(a) > len(b):  # type: ignore[arg-type]
            ra, rb = first + second // 2, second - second // 2
        else:
            ra, rb = second // 2, first + second - second // 2
        return cut(a, ra), cut(b, rb)  # type: ignore[arg-type]

    def pad(
        self,
        encoded_inputs: dict | list[dict],
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
        _check_pad_token: bool = True,
    ) -> BatchEncoding:
        """Pad a batch of encodings (a dict of lists of lists, or a list of dicts) to one length.

        Adds ``attention_mask`` (1 = real token, 0 = padding); pads on ``self.padding_side``.
        Also what a data collator calls.
        """
        if isinstance(encoded_inputs, (list, tuple)):
            encoded_inputs = {k: [e[k] for e in encoded_inputs] for k in encoded_inputs[0]} if encoded_inputs else {}
        batch = {k: [list(v.tolist() if isinstance(v, torch.Tensor) else v) for v in vs] for k, vs in encoded_inputs.items()}
        if "input_ids" not in batch:
            raise ValueError(f"pad needs 'input_ids' among the inputs, got {list(batch)}")
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        strategy = {True: "longest", "longest": "longest", "max_length": "max_length"}.get(padding, None)  # type: ignore[call-overload]
        if strategy is not None and _check_pad_token:
            self._require_pad_token()
        lengths = [len(x) for x in batch["input_ids"]]
        target = None
        if strategy == "longest":
            target = max(lengths, default=0)
        elif strategy == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length=...")
            target = max_length
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        out = BatchEncoding()
        if return_attention_mask and "attention_mask" not in batch:
            batch["attention_mask"] = [[1] * n for n in lengths]
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0,
                      "special_tokens_mask": 1}  # fmt: skip
        for key, rows in batch.items():
            if target is None or key not in pad_values:
                out[key] = rows
                continue
            value = pad_values[key]
            padded = []
            for row in rows:
                n = target - len(row)
                if n <= 0:
                    padded.append(row)
                else:
                    padded.append([value] * n + row if self.padding_side == "left" else row + [value] * n)
            out[key] = padded
        return _to_tensors(out, return_tensors, prepend_batch_axis=False)

    # --- ids -> text ------------------------------------------------------------------------------

    def decode(
        self,
        token_ids: int | Sequence[int] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Ids -> text. The space sentencepiece put in front of the first word is removed."""
        kwargs.pop("spaces_between_special_tokens", None)  # accepted; no effect without non-special added tokens
        _no_kwargs("decode", kwargs)
        if isinstance(token_ids, torch.Tensor):
            if token_ids.dim() > 1:
                raise ValueError(f"decode takes one sequence, got a tensor of shape {tuple(token_ids.shape)}; use batch_decode")
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        ids = [int(i) for i in token_ids]  # type: ignore[union-attr]
        self._check_ids(ids)
        text = self._decode_ids(ids, skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, **kwargs: Any) -> list[str]:
        """Decode each sequence of a batch (a list of lists or a (batch, seq) tensor)."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, **kwargs) for s in sequences]

    # --- chat -------------------------------------------------------------------------------------

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

    # --- saving and loading -----------------------------------------------------------------------

    def _serialized_model(self) -> bytes:
        raise NotImplementedError

    def _config(self) -> dict:
        """tokenizer_config.json, in the format transformers writes and reads."""
        added = {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}  # fmt: skip
            for i, t in sorted(self._added_tokens_decoder.items())
        }
        config = {
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "added_tokens_decoder": added,
            **{k: v for k, v in self._special.items()},
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "legacy": self.legacy,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "sp_model_kwargs": self.sp_model_kwargs,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "tokenizer_class": self._config_class_name,
            "use_default_system_prompt": self.use_default_system_prompt,
        }
        if self._additional_special_tokens:
            config["additional_special_tokens"] = list(self._additional_special_tokens)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    def save_vocabulary(self, save_directory: str | os.PathLike, filename_prefix: str | None = None) -> tuple[str]:
        """Write the sentencepiece model as ``[prefix-]tokenizer.model`` in an existing folder."""
        directory = Path(save_directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} is not a folder; create it first (save_pretrained creates it)")
        path = directory / ((filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        atomic_write_bytes(path, self._serialized_model())
        return (str(path),)

    def save_pretrained(self, save_directory: str | os.PathLike, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json (and, for the
        fast tokenizer, tokenizer.json) so that this class and transformers can load them.

        The files replace the previous tokenizer files all at once (a crash or a concurrent save
        never leaves a mixture); the other files of the folder (a model's weights) are kept."""
        directory = Path(save_directory)
        if directory.is_file():
            raise FileExistsError(f"{directory} is a file; save_pretrained needs a folder")
        written: list[str] = []
        # A tokenizer.json left by an earlier fast save would describe the old tokenizer: replaced too.
        stale_json = (filename_prefix + "-" if filename_prefix else "") + TOKENIZER_FILE
        with replace_folder_files(directory, lambda name: name in written or name == stale_json, last=None) as staging:
            written += [Path(f).name for f in self._save_files(staging, filename_prefix)]
        return tuple(str(directory / name) for name in written)

    def _save_files(self, directory: Path, filename_prefix: str | None) -> list[str]:
        """Write the tokenizer's files into ``directory`` (an empty staging folder)."""
        prefix = filename_prefix + "-" if filename_prefix else ""
        config_path = directory / (prefix + TOKENIZER_CONFIG_FILE)
        map_path = directory / (prefix + SPECIAL_TOKENS_MAP_FILE)
        atomic_write_bytes(config_path, (json.dumps(self._config(), indent=2, ensure_ascii=False) + "\n").encode())
        atomic_write_bytes(map_path, (json.dumps(self.special_tokens_map, indent=2, ensure_ascii=False) + "\n").encode())
        files = [str(config_path), str(map_path), *self.save_vocabulary(directory, filename_prefix)]
        files += [str(p) for p in self._save_backend(directory)]
        return files

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ):
        """Load from a folder with ``tokenizer.model`` (+ ``tokenizer_config.json`` /
        ``special_tokens_map.json``), a ``.model`` file, or a hub repo id such as
        ``"meta-llama/Llama-2-7b-hf"`` (downloaded with huggingface_hub). ``kwargs`` override
        the saved configuration, e.g. ``legacy=False`` or ``pad_token="<unk>"``."""
        name = os.fspath(pretrained_model_name_or_path)
        path = Path(name).expanduser()
        files: dict[str, Path] = {}
        if path.is_dir():
            for f in (VOCAB_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
                if (path / f).is_file():
                    files[f] = path / f
            if VOCAB_FILE not in files and not (cls._can_load_tokenizer_json and TOKENIZER_FILE in files):
                raise FileNotFoundError(
                    f"{path} has no {VOCAB_FILE}: put Llama's sentencepiece model file there (it comes with "
                    "every Llama 2 checkpoint)"
                )
        elif path.is_file():
            files[VOCAB_FILE] = path
        elif looks_like_repo_id(name):
            hub = dict(cache_dir=cache_dir, revision=revision, token=token, local_files_only=local_files_only)
            for f in (VOCAB_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
                found = resolve_file(name, f, missing_ok=f != VOCAB_FILE, **hub)
                if found is not None:
                    files[f] = found
        else:
            raise FileNotFoundError(
                f"{name} does not exist: pass a folder holding {VOCAB_FILE} (and optionally "
                f"{TOKENIZER_CONFIG_FILE}), a .model file, or a hub repo id like 'meta-llama/Llama-2-7b-hf'"
            )
        config: dict[str, Any] = {}
        if TOKENIZER_CONFIG_FILE in files:
            config.update(read_json_object(files[TOKENIZER_CONFIG_FILE], _RESAVE))
        if SPECIAL_TOKENS_MAP_FILE in files:
            for k, v in read_json_object(files[SPECIAL_TOKENS_MAP_FILE], _RESAVE).items():
                config.setdefault(k, v)
        # Which files to read is decided here, never by the folder's own JSON: a tokenizer_config.json
        # naming "vocab_file": "/some/other/file" must not make us read outside the folder.
        config.pop("vocab_file", None)
        config.pop("tokenizer_file", None)
        config.update(kwargs)
        init_args = _init_parameters(cls)
        config = {k: v for k, v in config.items() if k in init_args}  # hub configs carry other keys too
        config.setdefault("name_or_path", name)
        if VOCAB_FILE in files:
            config["vocab_file"] = str(files[VOCAB_FILE])
        if TOKENIZER_FILE in files and "tokenizer_file" in init_args:
            config.setdefault("tokenizer_file", str(files[TOKENIZER_FILE]))
        try:
            return cls(**config)
        except (TypeError, ValueError) as e:
            where = f" (loading the tokenizer from {name}: check its tokenizer_config.json and special_tokens_map.json)"
            raise (TypeError if isinstance(e, TypeError) else ValueError)(f"{e}{where}") from None

    _can_load_tokenizer_json = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"len={len(self)}, legacy={self.legacy}, padding_side={self.padding_side!r}, "
            f"special_tokens={self.special_tokens_map})"
        )


def clean_up_tokenization(text: str) -> str:
    """transformers' cleanup of English tokenization artefacts (" ." -> ".", " n't" -> "n't", ...)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(a, b)
    return text


def _no_kwargs(where: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"{where}() got unsupported keyword arguments {sorted(kwargs)}")


def _as_text_list(text: Any, name: str) -> list[str]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return list(text)
    raise TypeError(f"{name} must be a string or a list of strings, got {type(text).__name__}")


def _to_tensors(enc: BatchEncoding, return_tensors: str | None, prepend_batch_axis: bool) -> BatchEncoding:
    if return_tensors is None:
        return enc
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
    out = BatchEncoding()
    for k, v in enc.items():
        rows = [v] if prepend_batch_axis else v
        if rows and not isinstance(rows[0], list):  # e.g. "length": one number per sequence
            out[k] = torch.tensor(rows, dtype=torch.long)
            out[k] = out[k] if return_tensors == "pt" else out[k].numpy()
            continue
        if len({len(r) for r in rows}) > 1:
            raise ValueError(
                f"cannot make a tensor of {k}: the sequences have different lengths "
                f"{sorted({len(r) for r in rows})}; pass padding=True (and set a pad token) or truncation=True"
            )
        t = torch.tensor(rows, dtype=torch.long)
        if not rows:
            t = t.reshape(0, 0)
        out[k] = t if return_tensors == "pt" else t.numpy()
    return out


def _init_parameters(cls: type) -> set[str]:
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= set(inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}
    return names


# ----------------------------------------------------------------------------------------------
# The slow tokenizer: sentencepiece
# ----------------------------------------------------------------------------------------------


def _read_vocab_file(vocab_file: Any) -> bytes:
    if vocab_file is None:
        raise ValueError("vocab_file is required: the path of Llama's sentencepiece tokenizer.model")
    path = Path(vocab_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"vocab_file {vocab_file} does not exist; pass the path of a sentencepiece tokenizer.model "
            "(e.g. llama_edu.files.find_data_file('llama2-tokenizer.model'))"
        )
    return path.read_bytes()


class LlamaTokenizer(LlamaTokenizerBase):
    """Llama 2's tokenizer on the ``sentencepiece`` library, as transformers' ``LlamaTokenizer``.

    >>> tok = LlamaTokenizer.from_pretrained("path/with/tokenizer.model", legacy=True)
    >>> tok.encode("Hello this is a test")            # Meta's vocabulary
    [1, 15043, 445, 338, 263, 1243]

    ``sp_model_kwargs`` go to ``SentencePieceProcessor`` (e.g. ``enable_sampling=True,
    alpha=0.1`` for BPE-dropout). Pads on the right by default (``padding_side``), as transformers'
    slow class (its fast class pads on the left).
    """

    padding_side = "right"

    def __init__(self, vocab_file: str | os.PathLike | None = None, **kwargs: Any) -> None:
        import sentencepiece as spm

        self._model_bytes = _read_vocab_file(vocab_file)
        legacy = kwargs.get("legacy")
        self._spm = spm
        try:
            self.sp_model = self._load_sp(legacy is None or bool(legacy), kwargs.get("sp_model_kwargs") or {})
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{vocab_file} is not a sentencepiece model file ({e})") from e
        super().__init__(vocab_file, **kwargs)
        self._unk_token_length = len(self.sp_model.encode(str(self.unk_token))) if self.unk_token else 0

    def _load_sp(self, legacy: bool, sp_model_kwargs: dict):
        sp = self._spm.SentencePieceProcessor(**sp_model_kwargs)
        # legacy=False: sentencepiece must not add its own '▁' to every segment (see the module doc).
        sp.LoadFromSerializedProto(self._model_bytes if legacy else set_add_dummy_prefix(self._model_bytes, False))
        return sp

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def _piece_to_id(self, piece: str) -> int | None:
        index = self.sp_model.piece_to_id(piece)
        return index if self.sp_model.id_to_piece(index) == piece else None

    def _id_to_piece(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def _on_tokens_changed(self) -> None:
        super()._on_tokens_changed()
        if hasattr(self, "sp_model") and self._special.get("unk_token"):
            self._unk_token_length = len(self.sp_model.encode(str(self.unk_token)))

    def _encode_segment(self, segment: str) -> list[int]:
        if self.legacy or not segment.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp_model.encode(segment)
        # legacy=False and the segment starts with a space: sentencepiece without the dummy prefix
        # may drop a leading space, so encode "<unk>" + segment and cut the "<unk>" pieces off
        # (transformers' trick, kept for identical ids).
        ids = self.sp_model.encode(self.unk_token + segment)
        return ids[self._unk_token_length :] if len(ids) >= self._unk_token_length else ids

    def _encode_texts(self, texts: list[str], split_special_tokens: bool, prefix: bool = True) -> list[list[int]]:
        if not self.legacy:
            texts = self._legacy_false_prefix(texts, split_special_tokens, prefix)
        split_re = self._special_split_re()
        out = []
        for text in texts:
            if split_special_tokens:
                out.append(self._encode_segment(text) if text else [])
                continue
            ids: list[int] = []
            pos = 0
            for m in split_re.finditer(text):
                if m.start() > pos:
                    ids += self._encode_segment(text[pos : m.start()])
                ids.append(self._added_tokens_encoder[m.group()])
                pos = m.end()
            if pos < len(text):
                ids += self._encode_segment(text[pos:])
            out.append(ids)
        return out

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """transformers' algorithm: sentencepiece decodes the runs of ordinary pieces, special
        tokens are written as they are (with ``legacy=True``, a space goes before each)."""
        if not tokens:
            return ""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        special = set(self.all_special_tokens)
        current: list[str] = []
        out = ""
        prev_is_special = False
        for i, token in enumerate(tokens):
            if token in special:
                if not prev_is_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(current) + token
                prev_is_special = True
                current = []
            else:
                current.append(token)
                prev_is_special = False
        return out + self.sp_model.decode(current)

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        tokens = self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        return self.convert_tokens_to_string(tokens)  # type: ignore[arg-type]

    def _serialized_model(self) -> bytes:
        return self._model_bytes

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["_spm"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        import sentencepiece as spm

        self.__dict__.update(state)
        self._spm = spm
        self.sp_model = self._load_sp(self.legacy, self.sp_model_kwargs)


# ----------------------------------------------------------------------------------------------
# The fast tokenizer: Hugging Face tokenizers, built from the sentencepiece model
# ----------------------------------------------------------------------------------------------


def _merges_from_vocab(pieces: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges for the ``tokenizers`` library from sentencepiece's pieces and scores.

    sentencepiece stores no merge list: a pair may merge when its concatenation is a piece, and
    the piece's score is its priority. So every split of every piece into two pieces is a merge,
    ranked by the score of the merged piece (highest first; ties in vocabulary order, as
    transformers' SentencePieceExtractor does, so ids match transformers' fast tokenizer).
    """
    vocab = {p: i for i, p in enumerate(pieces)}
    merges: list[tuple[str, str, float]] = []
    for piece, score in zip(pieces, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)  # stable: equal scores keep vocabulary order
    return [(a, b) for a, b, _ in merges]


def _legacy_normalizer_json() -> dict:
    return {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": SPIECE_UNDERLINE},
        {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE}]}  # fmt: skip


class LlamaTokenizerFast(LlamaTokenizerBase):
    """Llama 2's tokenizer on Hugging Face ``tokenizers`` (Rust), built from the sentencepiece model.

    The pipeline, as transformers' converter builds it: a BPE model with the sentencepiece pieces,
    merges derived from their scores, and byte fallback; a normaliser that prepends '▁' and
    writes spaces as '▁'; a TemplateProcessing post-processor adding ``<s>`` (and ``</s>``);
    decoders that turn '▁' back into spaces, ``<0x..>`` pieces into bytes, and drop the first
    space. Same ids as :class:`LlamaTokenizer`. Pads on the left by default, as transformers'.
    After changing ``bos_token``/``eos_token``/``add_bos_token``/``add_eos_token`` the
    post-processor is rebuilt (``update_post_processor()``).
    """

    padding_side = "left"
    _config_class_name = "LlamaTokenizerFast"
    _can_load_tokenizer_json = True

    def __init__(self, vocab_file: str | os.PathLike | None = None, tokenizer_file: str | os.PathLike | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        from tokenizers import Tokenizer

        legacy = kwargs.get("legacy")
        self._legacy_for_backend = legacy is None or bool(legacy)
        self._backend_split = None
        if vocab_file is not None:
            self._model_bytes = _read_vocab_file(vocab_file)
            try:
                self._tokenizer = self._build_backend(with_special_pieces=True)
            except (RuntimeError, ValueError) as e:
                raise ValueError(f"{vocab_file} is not a sentencepiece model file ({e})") from e
        elif tokenizer_file is not None:
            # Only a tokenizer.json (e.g. a hub repo without tokenizer.model): load it as it is.
            self._model_bytes = None
            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
            if not self._legacy_for_backend:
                raise ValueError("legacy=False needs the sentencepiece tokenizer.model (vocab_file)")
        else:
            raise ValueError("LlamaTokenizerFast needs vocab_file (tokenizer.model) or tokenizer_file (tokenizer.json)")
        self._vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=False)
        super().__init__(vocab_file, **kwargs)

    def _sp_pieces(self) -> tuple[list[str], list[float], list[int]]:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(self._model_bytes)
        n = sp.get_piece_size()
        types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i) else 1
                 for i in range(n)]  # fmt: skip
        return [sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)], types

    def _build_backend(self, with_special_pieces: bool):
        """The ``tokenizers.Tokenizer`` pipeline for this vocabulary (see the class docstring)."""
        from tokenizers import AddedToken, Tokenizer, decoders, normalizers
        from tokenizers.models import BPE

        pieces, scores, types = self._sp_pieces()
        unk = pieces[types.index(UNKNOWN)] if UNKNOWN in types else "<unk>"
        vocab = {p: i for i, p in enumerate(pieces)}
        tok = Tokenizer(BPE(vocab, _merges_from_vocab(pieces, scores), unk_token=unk, fuse_unk=True, byte_fallback=True))
        if with_special_pieces:  # <unk>, <s>, </s> are matched in the text as special tokens
            tok.add_special_tokens([AddedToken(p, normalized=False, special=True)
                                    for p, t in zip(pieces, types) if t in (UNKNOWN, CONTROL)])  # fmt: skip
        steps = [normalizers.Replace(" ", SPIECE_UNDERLINE)]
        if self._legacy_for_backend:
            steps.insert(0, normalizers.Prepend(SPIECE_UNDERLINE))  # '▁' before every text segment
        tok.normalizer = normalizers.Sequence(steps)
        tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])  # fmt: skip
        return tok

    @property
    def backend_tokenizer(self):
        """The ``tokenizers.Tokenizer`` doing the work."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _piece_to_id(self, piece: str) -> int | None:
        index = self._tokenizer.token_to_id(piece)
        return index if index is not None and index < self._vocab_size else None

    def _id_to_piece(self, index: int) -> str:
        return self._tokenizer.id_to_token(index)

    def _on_new_token(self, token: str, index: int) -> None:
        from tokenizers import AddedToken

        self._tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)])
        got = self._tokenizer.token_to_id(token)
        if got != index:
            raise RuntimeError(f"tokenizers gave the added token {token!r} id {got}, expected {index}")

    def _on_tokens_changed(self) -> None:
        super()._on_tokens_changed()
        if hasattr(self, "_tokenizer"):
            # Special tokens of the base vocabulary (e.g. pad_token = "<unk>") must be matched in text too.
            from tokenizers import AddedToken

            missing = self._missing_added_tokens()
            if missing:
                self._tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in missing])
            self.update_post_processor()

    def _missing_added_tokens(self) -> list[str]:
        have = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        return [t for t in self._added_tokens_encoder if t not in have]

    def update_post_processor(self) -> None:
        """Rebuild the TemplateProcessing post-processor from the current bos/eos settings."""
        from tokenizers import processors

        bos, eos = self.bos_token, self.eos_token
        if bos is None and self.add_bos_token:
            raise ValueError("add_bos_token=True but bos_token is None")
        if eos is None and self.add_eos_token:
            raise ValueError("add_eos_token=True but eos_token is None")
        single = f"{(bos + ':0 ') if self.add_bos_token else ''}$A:0{(' ' + eos + ':0') if self.add_eos_token else ''}"
        pair = f"{single}{(' ' + bos + ':1') if self.add_bos_token else ''} $B:1{(' ' + eos + ':1') if self.add_eos_token else ''}"
        special = []
        if self.add_bos_token:
            special.append((bos, self.bos_token_id))
        if self.add_eos_token:
            special.append((eos, self.eos_token_id))
        self._tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    def _encode_texts(self, texts: list[str], split_special_tokens: bool, prefix: bool = True) -> list[list[int]]:
        if not texts:
            return []
        if not self.legacy:
            texts = self._legacy_false_prefix(texts, split_special_tokens, prefix)
        backend = self._tokenizer
        if split_special_tokens:
            if self._backend_split is None:  # the same pipeline without special tokens matched in text
                self._backend_split = self._build_backend(with_special_pieces=False)
            backend = self._backend_split
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._tokenizer.decoder.decode(list(tokens))

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _serialized_model(self) -> bytes:
        if self._model_bytes is None:
            raise ValueError("this fast tokenizer was loaded from tokenizer.json alone; it has no tokenizer.model to save")
        return self._model_bytes

    def _save_backend(self, directory: Path) -> list[Path]:
        """tokenizer.json for transformers' LlamaTokenizerFast (which in 4.37.2 always behaves as
        legacy=True, so the saved pipeline is the legacy one)."""
        data = json.loads(self._tokenizer.to_str())
        data["normalizer"] = _legacy_normalizer_json()
        path = directory / TOKENIZER_FILE
        atomic_write_bytes(path, json.dumps(data, ensure_ascii=False).encode("utf-8"))
        return [path]

    def _save_files(self, directory: Path, filename_prefix: str | None) -> list[str]:
        if self._model_bytes is None:
            prefix = filename_prefix + "-" if filename_prefix else ""
            paths = [directory / (prefix + TOKENIZER_CONFIG_FILE), directory / (prefix + SPECIAL_TOKENS_MAP_FILE)]
            atomic_write_bytes(paths[0], (json.dumps(self._config(), indent=2) + "\n").encode())
            atomic_write_bytes(paths[1], (json.dumps(self.special_tokens_map, indent=2) + "\n").encode())
            return [str(p) for p in paths + self._save_backend(directory)]
        return super()._save_files(directory, filename_prefix)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tokenizer"] = self._tokenizer.to_str()
        state["_backend_split"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer

        state["_tokenizer"] = Tokenizer.from_str(state["_tokenizer"])
        self.__dict__.update(state)
