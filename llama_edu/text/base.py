"""What the slow and the fast Llama tokenizers share: special and added tokens, ``__call__`` with
padding, truncation and tensors, decoding, saving and loading (see :mod:`llama_edu.text.tokenizer`)."""

from __future__ import annotations

import json
import numbers
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..io.atomic_save import replace_folder_files
from .bpe import SPIECE_UNDERLINE
from ..io.files import atomic_write_bytes, looks_like_repo_id, read_json_object, resolve_file
from .chat_template import ChatTemplateMixin
from .encoding import BatchEncoding, _to_tensors, as_token_ids, check_text


_RESAVE = "re-save the tokenizer or delete that file"

VOCAB_FILE = "tokenizer.model"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

#: transformers' stand-in for "no limit" on model_max_length.
VERY_LARGE_INTEGER = int(1e30)

# Meta's chat format (llama/generation.py): [INST] user [/INST] answer, with the system prompt
# folded into the first user message between <<SYS>> markers.

#: The default system prompt of Llama 2 chat (transformers' DEFAULT_SYSTEM_PROMPT).
SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "pad_token")

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


# ----------------------------------------------------------------------------------------------
# The shared base class
# ----------------------------------------------------------------------------------------------


class LlamaTokenizerBase(ChatTemplateMixin):
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
        if isinstance(ids, torch.Tensor) and ids.dim() == 0 and not ids.is_floating_point():
            ids = ids.item()
        if isinstance(ids, numbers.Integral) and not isinstance(ids, bool):
            ids = int(ids)
            self._check_ids([ids])
            return self._added_tokens_decoder.get(ids) or self._id_to_piece(ids)
        ids = as_token_ids(ids, "convert_ids_to_tokens")
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
        check_text(text)
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
        if isinstance(token_ids, torch.Tensor) and token_ids.dim() > 1:
            raise ValueError(f"decode takes one sequence, got a tensor of shape {tuple(token_ids.shape)}; use batch_decode")
        ids = as_token_ids(token_ids)
        self._check_ids(ids)
        text = self._decode_ids(ids, skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, **kwargs: Any) -> list[str]:
        """Decode each sequence of a batch (a list of lists or a (batch, seq) tensor)."""
        if isinstance(sequences, torch.Tensor):
            if sequences.is_floating_point():
                raise ValueError(f"batch_decode takes integer token ids, got a {sequences.dtype} tensor; pass a torch.long tensor")
            sequences = sequences.tolist()
        return [self.decode(s, **kwargs) for s in sequences]

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
        return [check_text(text, name)]
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return [check_text(t, f"{name}[{i}]") for i, t in enumerate(text)]
    raise TypeError(f"{name} must be a string or a list of strings, got {type(text).__name__}")


def _init_parameters(cls: type) -> set[str]:
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= set(inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}
    return names


# ----------------------------------------------------------------------------------------------
# The slow tokenizer: sentencepiece
