"""Byte-pair encoding from scratch, checked against sentencepiece.

Llama 2's tokenizer is a SentencePiece BPE model: a list of 32,000 *pieces*, each with a *score*.
Encoding a text is four small steps, all written out here in plain Python:

1. normalise: prepend one space (``add_dummy_prefix``) and write every space as ``▁`` (U+2581),
   so "Hello world" becomes "▁Hello▁world";
2. split into single characters: ``▁ H e l l o ▁ w o r l d``;
3. merge: repeatedly join the adjacent pair whose concatenation is a piece of the vocabulary
   with the *highest score* (ties: the leftmost pair), until no adjacent pair forms a piece;
4. look up ids; a symbol that is not a piece (an emoji, a Chinese character the vocabulary never
   saw) is written as its UTF-8 bytes, each one a ``<0x..>`` piece (*byte fallback*), so no
   text is ever unknown.

This module also reads the ``tokenizer.model`` file itself (a protocol-buffer message, parsed
by hand below, so nothing beyond the standard library is needed), trains a small Llama-style
vocabulary from a text in plain Python (:func:`train_bpe`), and trains one with the real
sentencepiece trainer and Llama 2's settings (:func:`train_sentencepiece`).

References: Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units"
(BPE); Kudo & Richardson 2018, "SentencePiece"; sentencepiece's ``bpe_model.cc``.
"""

from __future__ import annotations

import heapq
import io
import os
import re
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..io.files import atomic_write_bytes

#: The space marker: SentencePiece writes every space as this character (U+2581).
SPIECE_UNDERLINE = "▁"

# Piece types of sentencepiece_model.proto (SentencePiece.Type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

#: Llama 2's SentencePiece trainer settings (read from the ``trainer_spec``/``normalizer_spec``
#: stored inside Meta's ``tokenizer.model``), minus the corpus-size ones.
LLAMA2_TRAINER_SETTINGS: dict = dict(
    model_type="bpe",
    byte_fallback=True,  # unknown characters become <0x..> byte pieces, never <unk>
    split_digits=True,  # "2024" -> "2", "0", "2", "4"
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    normalization_rule_name="identity",  # no NFKC: text is kept byte for byte
    add_dummy_prefix=True,  # "Hello" is encoded as " Hello" -> "▁Hello"
    remove_extra_whitespaces=False,  # "a  b" keeps both spaces
    allow_whitespace_only_pieces=True,  # "▁▁▁▁" (code indentation) may become a piece
    max_sentencepiece_length=16,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,  # Llama 2 has no padding token
    character_coverage=1.0,
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
    num_threads=1,  # one thread: the same corpus always gives the same model
    shuffle_input_sentence=False,
    input_sentence_size=0,  # use every line
    max_sentence_length=4192,
)


# ----------------------------------------------------------------------------------------------
# Reading and writing tokenizer.model: a protocol buffer, parsed by hand
# ----------------------------------------------------------------------------------------------
# A protobuf message is a sequence of fields. Each field starts with a varint key
# (field_number << 3 | wire_type); wire type 0 is a varint, 1 a fixed 64-bit value, 2 a
# length-prefixed byte string (strings and sub-messages), 5 a fixed 32-bit value (floats).


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _write_varint(value: int) -> bytes:
    if value < 0:  # negative int32 values are written as 10-byte two's complement varints
        value += 1 << 64
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _parse_fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """Split a protobuf message into ``(field_number, wire_type, value)`` triples."""
    fields, pos = [], 0
    while pos < len(buf):
        try:
            key, pos = _read_varint(buf, pos)
        except IndexError:
            raise ValueError("not a SentencePiece model: the protobuf data is truncated") from None
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"not a SentencePiece model: unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("not a SentencePiece model: the protobuf data is truncated")
        fields.append((number, wire, value))
    return fields


def _serialize_fields(fields: Iterable[tuple[int, int, int | bytes]]) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += _write_varint(number << 3 | wire)
        if wire == 0:
            out += _write_varint(value)  # type: ignore[arg-type]
        elif wire == 2:
            out += _write_varint(len(value)) + value  # type: ignore[arg-type,operator]
        else:
            out += value  # type: ignore[operator]
    return bytes(out)


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# Field numbers of sentencepiece_model.proto that this module reads.
_TRAINER_FIELDS = {3: "model_type", 4: "vocab_size", 35: "byte_fallback", 25: "split_digits",
                   40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id",
                   45: "unk_piece", 46: "bos_piece", 47: "eos_piece", 48: "pad_piece"}  # fmt: skip
_NORMALIZER_FIELDS = {1: "name", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}


@dataclass
class SentencePieceModel:
    """What a ``tokenizer.model`` file holds: the pieces with scores and types, and the settings.

    ``trainer_spec``/``normalizer_spec`` hold the fields this module needs, with the proto
    defaults filled in (e.g. ``add_dummy_prefix=True``, ``model_type=1`` unigram / ``2`` BPE).
    """

    pieces: list[str]
    scores: list[float]
    types: list[int]
    trainer_spec: dict = field(default_factory=dict)
    normalizer_spec: dict = field(default_factory=dict)

    @classmethod
    def from_bytes(cls, data: bytes) -> "SentencePieceModel":
        pieces, scores, types = [], [], []
        trainer = dict(model_type=1, byte_fallback=False, split_digits=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                       unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>")  # fmt: skip
        normalizer = dict(name="", add_dummy_prefix=True, remove_extra_whitespaces=True, escape_whitespaces=True)
        try:
            for number, _, value in _parse_fields(data):
                if number == 1:  # repeated SentencePiece pieces
                    piece, score, typ = "", 0.0, NORMAL
                    for n, _, v in _parse_fields(value):  # type: ignore[arg-type]
                        if n == 1:
                            piece = v.decode("utf-8")  # type: ignore[union-attr]
                        elif n == 2:
                            score = struct.unpack("<f", v)[0]  # type: ignore[arg-type]
                        elif n == 3:
                            typ = v  # type: ignore[assignment]
                    pieces.append(piece)
                    scores.append(score)
                    types.append(typ)
                elif number in (2, 3):  # trainer_spec, normalizer_spec
                    names, spec = (_TRAINER_FIELDS, trainer) if number == 2 else (_NORMALIZER_FIELDS, normalizer)
                    for n, _, v in _parse_fields(value):  # type: ignore[arg-type]
                        if n in names:
                            old = spec[names[n]] if names[n] in spec else 0
                            if isinstance(v, bytes):
                                spec[names[n]] = v.decode("utf-8")
                            elif isinstance(old, bool):
                                spec[names[n]] = bool(v)
                            else:
                                spec[names[n]] = _int32(v)
        except (IndexError, UnicodeDecodeError, struct.error) as e:
            raise ValueError(f"not a SentencePiece model file (cannot parse it: {e})") from None
        if not pieces:
            raise ValueError("not a SentencePiece model file: it holds no pieces")
        return cls(pieces, scores, types, trainer, normalizer)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SentencePieceModel":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {path} does not exist")
        return cls.from_bytes(path.read_bytes())

    def to_bytes(self) -> bytes:
        """Serialize as a ``tokenizer.model`` that the sentencepiece library loads."""
        t, n = self.trainer_spec, self.normalizer_spec
        pieces = [
            (1, 2, _serialize_fields([(1, 2, p.encode("utf-8")), (2, 5, struct.pack("<f", s)), (3, 0, ty)]))
            for p, s, ty in zip(self.pieces, self.scores, self.types)
        ]
        trainer = _serialize_fields(
            [(3, 0, t.get("model_type", 2)), (4, 0, len(self.pieces)), (35, 0, int(t.get("byte_fallback", True))),
             (25, 0, int(t.get("split_digits", True))),
             (40, 0, t.get("unk_id", 0)), (41, 0, t.get("bos_id", 1)), (42, 0, t.get("eos_id", 2)),
             (43, 0, t.get("pad_id", -1))]  # fmt: skip
        )
        normalizer = _serialize_fields(
            [(1, 2, n.get("name", "identity").encode()), (3, 0, int(n.get("add_dummy_prefix", True))),
             (4, 0, int(n.get("remove_extra_whitespaces", False))), (5, 0, int(n.get("escape_whitespaces", True)))]  # fmt: skip
        )
        return _serialize_fields(pieces + [(2, 2, trainer), (3, 2, normalizer)])


def set_add_dummy_prefix(model_bytes: bytes, value: bool) -> bytes:
    """Return a copy of a serialized ``tokenizer.model`` with ``normalizer_spec.add_dummy_prefix`` set.

    transformers' ``LlamaTokenizer(legacy=False)`` loads sentencepiece this way (it edits the
    proto with the ``protobuf`` package; this does the same with the hand-written parser).
    """
    fields = _parse_fields(model_bytes)
    out, found = [], False
    for number, wire, value_ in fields:
        if number == 3 and wire == 2:
            inner = [f for f in _parse_fields(value_) if f[0] != 3]  # type: ignore[arg-type]
            value_ = _serialize_fields(inner + [(3, 0, int(value))])
            found = True
        out.append((number, wire, value_))
    if not found:
        out.append((3, 2, _serialize_fields([(3, 0, int(value))])))
    return _serialize_fields(out)


# ----------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------


class SentencePieceBPE:
    """A SentencePiece BPE encoder/decoder in plain Python, giving the same ids as sentencepiece.

    Build it from a model file (:meth:`from_file`) or from pieces/scores made by
    :func:`train_bpe`. ``encode("Hello")`` -> list of ids (no BOS/EOS); ``decode(ids)`` -> text.
    """

    def __init__(
        self,
        pieces: list[str],
        scores: list[float],
        types: list[int] | None = None,
        byte_fallback: bool = True,
        add_dummy_prefix: bool = True,
        unk_id: int = 0,
    ) -> None:
        if len(pieces) != len(scores):
            raise ValueError(f"got {len(pieces)} pieces but {len(scores)} scores; give one score per piece")
        self.pieces = list(pieces)
        self.scores = list(scores)
        self.types = list(types) if types is not None else [NORMAL] * len(pieces)
        self.byte_fallback = byte_fallback
        self.add_dummy_prefix = add_dummy_prefix
        self.unk_id = unk_id
        # Only normal and user-defined pieces take part in merges; <s>, </s>, <unk> and the byte
        # pieces are never produced by merging text (as in sentencepiece's model_interface.cc).
        self.piece_to_id: dict[str, int] = {}
        for i, (p, t) in enumerate(zip(self.pieces, self.types)):
            if t in (NORMAL, USER_DEFINED, UNUSED):
                self.piece_to_id.setdefault(p, i)
        self.byte_to_id: dict[int, int] = {}
        for i, (p, t) in enumerate(zip(self.pieces, self.types)):
            if t == BYTE:
                self.byte_to_id[int(p[3:5], 16)] = i
        if byte_fallback and len(self.byte_to_id) != 256:
            raise ValueError(f"byte_fallback needs the 256 pieces <0x00>..<0xFF>, the vocabulary has {len(self.byte_to_id)}")
        user = sorted((p for p, t in zip(self.pieces, self.types) if t == USER_DEFINED), key=len, reverse=True)
        # User-defined pieces are matched whole before merging; everything else starts as one character.
        self._split = re.compile("|".join(map(re.escape, user)) + "|." if user else ".", re.S)

    @classmethod
    def from_model(cls, model: SentencePieceModel) -> "SentencePieceBPE":
        if model.trainer_spec.get("model_type") != 2:
            raise ValueError("this is not a BPE SentencePiece model (model_type is not BPE)")
        return cls(model.pieces, model.scores, model.types, bool(model.trainer_spec.get("byte_fallback")),
                   bool(model.normalizer_spec.get("add_dummy_prefix", True)), model.trainer_spec.get("unk_id", 0))  # fmt: skip

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SentencePieceBPE":
        """Read a SentencePiece BPE ``tokenizer.model`` (Meta's or the project's)."""
        return cls.from_model(SentencePieceModel.from_file(path))

    def __len__(self) -> int:
        return len(self.pieces)

    def normalize(self, text: str) -> str:
        """Llama's normaliser: identity, plus the dummy prefix and spaces written as ``▁``."""
        if self.add_dummy_prefix and text:
            text = " " + text
        return text.replace(" ", SPIECE_UNDERLINE)

    def merge(self, symbols: list[str]) -> list[str]:
        """Merge adjacent symbols, best-scoring pair first, until no pair forms a piece.

        A heap holds every adjacent pair whose concatenation is a piece, keyed by
        ``(-score, left position)``; the symbols form a linked list so that a merge is O(log n).
        """
        n = len(symbols)
        if n < 2:
            return symbols
        sym = list(symbols)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        vocab, scores = self.piece_to_id, self.scores
        heap: list[tuple[float, int, int, str]] = []

        def push(left: int, right: int) -> None:
            merged = sym[left] + sym[right]
            i = vocab.get(merged)
            if i is not None:
                heapq.heappush(heap, (-scores[i], left, right, merged))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            # Skip stale entries: one of the two symbols was merged into something else already.
            if not sym[left] or not sym[right] or nxt[left] != right or sym[left] + sym[right] != merged:
                continue
            sym[left], sym[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[right] != -1:
                prev[nxt[right]] = left
            if prev[left] != -1:
                push(prev[left], left)
            if nxt[left] != -1:
                push(left, nxt[left])
        return [s for s in sym if s]

    def encode_as_pieces(self, text: str) -> list[str]:
        """Text -> pieces, e.g. "Hello world" -> ["▁Hello", "▁world"] (bytes as ``<0x..>``)."""
        symbols = self.merge(self._split.findall(self.normalize(text)))
        out = []
        for s in symbols:
            if s in self.piece_to_id:
                out.append(s)
            elif self.byte_fallback:
                out.extend(f"<0x{b:02X}>" for b in s.encode("utf-8"))
            else:
                out.append(self.pieces[self.unk_id])
        return out

    def encode(self, text: str) -> list[int]:
        """Text -> token ids, without BOS/EOS; identical to ``SentencePieceProcessor.encode``."""
        symbols = self.merge(self._split.findall(self.normalize(text)))
        ids: list[int] = []
        for s in symbols:
            i = self.piece_to_id.get(s)
            if i is not None:
                ids.append(i)
            elif self.byte_fallback:
                ids.extend(self.byte_to_id[b] for b in s.encode("utf-8"))
            else:
                ids.append(self.unk_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text: bytes pieces are gathered and UTF-8 decoded, ``▁`` becomes a space,
        control pieces (<s>, </s>) vanish, and the dummy prefix space is dropped."""
        out = bytearray()
        for i in ids:
            if not 0 <= i < len(self.pieces):
                raise ValueError(f"token id {i} is out of range for a vocabulary of {len(self.pieces)} pieces")
            t = self.types[i]
            if t == BYTE:
                out.append(int(self.pieces[i][3:5], 16))
            elif t == CONTROL:
                continue
            elif t == UNKNOWN:
                out += " \u2047 ".encode()
            else:
                out += self.pieces[i].replace(SPIECE_UNDERLINE, " ").encode("utf-8")
        text = out.decode("utf-8", errors="replace")
        if self.add_dummy_prefix and text.startswith(" "):
            text = text[1:]
        return text

    def to_model(self, trainer_spec: dict | None = None) -> SentencePieceModel:
        """This vocabulary as a :class:`SentencePieceModel` (``.to_bytes()`` gives a tokenizer.model)."""
        trainer = dict(model_type=2, byte_fallback=self.byte_fallback, unk_id=self.unk_id, bos_id=1, eos_id=2, pad_id=-1)
        trainer.update(trainer_spec or {})
        normalizer = dict(name="identity", add_dummy_prefix=self.add_dummy_prefix,
                          remove_extra_whitespaces=False, escape_whitespaces=True)  # fmt: skip
        return SentencePieceModel(self.pieces, self.scores, self.types, trainer, normalizer)


# ----------------------------------------------------------------------------------------------
# The trainer, from scratch
# ----------------------------------------------------------------------------------------------

# Llama-style pre-split of a normalised line into "words" that merges never cross:
# runs of spaces (all but the last ▁, which starts the next word), single digits
# (split_digits), letter runs and punctuation runs each with an optional leading ▁
# (a crude split_by_unicode_script).
_WORD_RE = re.compile(r"▁+(?=[▁\d])|\d|▁?[^\W\d_]+|▁?[^\w▁\s]+|▁?_+|▁?\s|▁+")


@dataclass
class BPETrainingResult:
    """What :func:`train_bpe` learned: the encoder, and the merges in the order they were made."""

    tokenizer: SentencePieceBPE
    merges: list[tuple[str, str]]
    merge_counts: list[int]


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of ``pair`` in ``symbols`` (left to right) by
    the joined symbol: ``merge_pair(["▁", "t", "h", "e"], ("▁", "t"))`` -> ``["▁t", "h", "e"]``."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def pre_split(text: str) -> Counter:
    """Count the "words" of a text as the trainer sees them: each line gets the dummy prefix,
    spaces become ``▁``, then it is cut where no merge may cross (see ``_WORD_RE``)."""
    words: Counter = Counter()
    for line in text.split("\n"):
        if line:
            words.update(_WORD_RE.findall(SPIECE_UNDERLINE + line.replace(" ", SPIECE_UNDERLINE)))
    return words


def train_bpe(
    text: str,
    vocab_size: int = 512,
    character_coverage: float = 1.0,
    max_piece_length: int = 16,
    byte_fallback: bool = True,
) -> BPETrainingResult:
    """Learn a Llama-style BPE vocabulary from ``text`` in plain Python.

    The vocabulary is laid out as Llama's: ``<unk>``, ``<s>``, ``</s>``, the 256 byte pieces
    ``<0x00>``..``<0xFF>`` (byte fallback), then the merged pieces in the order they were
    learned (score ``-k`` for the k-th merge, so earlier merges win), then the single characters
    (most frequent first). Each line is one sentence; words start with ``▁``; digits stay single.

    Each step counts every adjacent pair of symbols over all words (weighted by word frequency)
    and merges the most frequent pair everywhere (Sennrich et al. 2016, Algorithm 1). Counts are
    updated incrementally, only for the words that contain the merged pair.
    """
    if not text:
        raise ValueError("cannot train a tokenizer on an empty text")
    specials = ["<unk>", "<s>", "</s>"]
    n_fixed = len(specials) + (256 if byte_fallback else 0)
    word_counts = pre_split(text)
    char_counts: Counter = Counter()
    for w, c in word_counts.items():
        for ch in w:
            char_counts[ch] += c
    # character_coverage: keep the most frequent characters covering that share of the text;
    # the rest are left to byte fallback.
    total = sum(char_counts.values())
    chars, covered = [], 0
    for ch, c in sorted(char_counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if covered >= character_coverage * total and chars:
            break
        chars.append(ch)
        covered += c
    n_merges = vocab_size - n_fixed - len(chars)
    if n_merges < 0:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the specials, byte pieces and {len(chars)} characters "
            f"already need {n_fixed + len(chars)}; use at least that, or lower character_coverage"
        )
    known = set(chars)
    # Words as lists of symbols; a character outside the kept set never merges (it becomes bytes).
    words = [list(w) for w in word_counts]
    freqs = list(word_counts.values())
    pair_counts: Counter = Counter()
    where: defaultdict = defaultdict(set)  # pair -> indices of words that contain it
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for a, b in zip(w, w[1:]):
            if a in known and b in known and len(a) + len(b) <= max_piece_length:
                pair_counts[a, b] += f
                where[a, b].add(wi)

    merges: list[tuple[str, str]] = []
    merge_counts: list[int] = []
    countable = set(chars)  # symbols whose pairs are counted: kept characters and merged pieces
    while len(merges) < n_merges and pair_counts:
        # The most frequent pair; ties broken by the pair itself so training is deterministic.
        best, count = max(pair_counts.items(), key=lambda kv: (kv[1], kv[0]))
        new = best[0] + best[1]
        if len(new) > max_piece_length:  # too long to be a piece: never merge this pair
            del pair_counts[best]
            where.pop(best, None)
            continue
        merges.append(best)
        merge_counts.append(count)
        countable.add(new)
        for wi in where.pop(best, ()):
            w, f = words[wi], freqs[wi]
            # Take this word's pairs out of the counts, merge the pair in it, put its pairs back.
            for a, b in zip(w, w[1:]):
                if (a, b) in pair_counts:
                    pair_counts[a, b] -= f
                    if pair_counts[a, b] <= 0:
                        del pair_counts[a, b]
            words[wi] = merged = merge_pair(w, best)
            for a, b in zip(merged, merged[1:]):
                if a in countable and b in countable and len(a) + len(b) <= max_piece_length:
                    pair_counts[a, b] += f
                    where[a, b].add(wi)
        pair_counts.pop(best, None)

    pieces = specials + ([f"<0x{b:02X}>" for b in range(256)] if byte_fallback else [])
    types = [UNKNOWN, CONTROL, CONTROL] + ([BYTE] * 256 if byte_fallback else [])
    scores = [0.0] * len(pieces)
    merged_pieces = [a + b for a, b in merges]
    new_pieces = merged_pieces + [c for c in chars if c not in set(merged_pieces)]
    pieces += new_pieces
    scores += [-float(k) for k in range(len(new_pieces))]
    types += [NORMAL] * len(new_pieces)
    tok = SentencePieceBPE(pieces, scores, types, byte_fallback=byte_fallback, add_dummy_prefix=True, unk_id=0)
    return BPETrainingResult(tok, merges, merge_counts)


# ----------------------------------------------------------------------------------------------
# The real trainer, with Llama 2's settings
# ----------------------------------------------------------------------------------------------




def train_sentencepiece(
    input_file: str | os.PathLike,
    vocab_size: int = 2048,
    output_file: str | os.PathLike | None = None,
    **overrides,
) -> bytes:
    """Train a SentencePiece BPE model with Llama 2's settings on a text file (one sentence per line).

    Returns the serialized model (the bytes of a ``tokenizer.model``); when ``output_file`` is
    given, also writes them there atomically. ``overrides`` change any trainer setting.
    This is what ``scripts/train_tokenizer.py`` runs to make ``data/tokenizer.model``.
    """
    import sentencepiece as spm

    input_file = Path(input_file)
    if not input_file.is_file():
        raise FileNotFoundError(f"training text {input_file} does not exist; pass the path of a text file")
    if vocab_size < 3 + 256 + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte fallback alone needs 3 special + 256 byte pieces"
        )
    settings = {**LLAMA2_TRAINER_SETTINGS, **overrides}
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(0)
    model = io.BytesIO()
    # Feed the lines through an iterator rather than the path, so that no machine path is stored
    # in the model's trainer_spec (the file is committed and shared).
    with open(input_file, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), vocab_size=vocab_size, model_writer=model, minloglevel=2, **settings
    )
    data = model.getvalue()
    if output_file is not None:
        atomic_write_bytes(output_file, data)
    return data
