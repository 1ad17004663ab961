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
from pathlib import Path
from typing import Any

from ..io.files import atomic_write_bytes
from .base import SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, LlamaTokenizerBase
from .bpe import BYTE, CONTROL, SPIECE_UNDERLINE, UNKNOWN, set_add_dummy_prefix
# Defined beside the base class or the chat template, importable from here as before:
from .base import VOCAB_FILE  # noqa: F401
from .chat_template import DEFAULT_SYSTEM_PROMPT  # noqa: F401
from .encoding import BatchEncoding  # noqa: F401

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
