"""Tests for llama_edu.bpe: the from-scratch encoder/trainer against sentencepiece."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from llama_edu.bpe import (
    BYTE,
    CONTROL,
    LLAMA2_TRAINER_SETTINGS,
    NORMAL,
    UNKNOWN,
    SentencePieceBPE,
    SentencePieceModel,
    pre_split,
    set_add_dummy_prefix,
    train_bpe,
    train_sentencepiece,
)
from llama_edu.files import PROJECT_DATA_DIR, find_data_file

spm = pytest.importorskip("sentencepiece")

HARD_CASES = [
    "",
    " ",
    "    ",
    " leading",
    "trailing ",
    "multiple   spaces    here",
    "new\nlines\n\n",
    "\ttab\t\t",
    "digits 0123456789 and 3.14",
    "emoji 😀🦙 🇫🇷",
    "日本語 中文 한국어 Ελληνικά русский עברית العربية हिन्दी",
    "café naïve",
    "<s> written literally </s> <unk>",
    "▁ the marker itself",
    "x" * 100,
    " " * 40 + "indent",
]


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return find_data_file("tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def lines(shakespeare) -> list[str]:
    return shakespeare.split("\n")[:3000]


MODELS = {
    "meta": lambda: str(find_data_file("llama2-tokenizer.model")),
    "project": lambda: str(PROJECT_DATA_DIR / "tokenizer.model"),
}


@pytest.mark.parametrize("which", list(MODELS))
def test_encoder_matches_sentencepiece(which, lines):
    path = MODELS[which]()
    sp = spm.SentencePieceProcessor(model_file=path)
    bpe = SentencePieceBPE.from_file(path)
    assert len(bpe) == sp.vocab_size()
    for text in lines + HARD_CASES:
        assert bpe.encode(text) == sp.encode(text), text
    for text in HARD_CASES:
        assert bpe.encode_as_pieces(text) == sp.encode(text, out_type=str), text
        assert bpe.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text


def test_encoder_details_meta():
    bpe = SentencePieceBPE.from_file(find_data_file("llama2-tokenizer.model"))
    assert bpe.encode("Hello this is a test") == [15043, 445, 338, 263, 1243]
    assert bpe.normalize("Hello world") == "▁Hello▁world"
    # byte fallback: an emoji becomes its 4 UTF-8 bytes
    assert bpe.encode_as_pieces("🦙") == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert bpe.decode(bpe.encode("🦙 and 日本")) == "🦙 and 日本"
    # merging picks the best score first: "▁▁" has a very low score, so "▁c" wins in "b  c"
    assert bpe.encode_as_pieces("b  c") == ["▁b", "▁", "▁c"]
    with pytest.raises(ValueError, match="out of range"):
        bpe.decode([32000])


def test_merge_is_greedy_by_score():
    # a toy vocabulary: "ab" scores higher than "bc", so "abc" -> "ab" + "c"
    pieces = ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
    toy = SentencePieceBPE(pieces, [0, 0, 0, 0, -1.0, -2.0, -3.0], [UNKNOWN] + [NORMAL] * 6,
                           byte_fallback=False, add_dummy_prefix=False)  # fmt: skip
    assert toy.merge(list("abc")) == ["abc"]  # ab, then ab+c
    toy2 = SentencePieceBPE(pieces[:6], [0, 0, 0, 0, -2.0, -1.0], [UNKNOWN] + [NORMAL] * 5,
                            byte_fallback=False, add_dummy_prefix=False)  # fmt: skip
    assert toy2.merge(list("abc")) == ["a", "bc"]  # bc scores higher now
    assert toy2.encode("abd") == [4, 0]  # no byte fallback: "d" is unknown
    # ties go to the leftmost pair
    toy3 = SentencePieceBPE(["<unk>", "a", "aa"], [0, 0, -1.0], [UNKNOWN, NORMAL, NORMAL], False, False)
    assert toy3.merge(list("aaa")) == ["aa", "a"]


def test_model_file_parser(tmp_path):
    path = find_data_file("llama2-tokenizer.model")
    model = SentencePieceModel.from_file(path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert len(model.pieces) == sp.vocab_size() == 32000
    for i in (0, 1, 2, 3, 13, 259, 15043, 31999):
        assert model.pieces[i] == sp.id_to_piece(i) and model.scores[i] == sp.get_score(i)
    assert model.types[:4] == [UNKNOWN, CONTROL, CONTROL, BYTE] and model.types[15043] == NORMAL
    assert model.trainer_spec["model_type"] == 2 and model.trainer_spec["byte_fallback"] is True
    assert (model.trainer_spec["unk_id"], model.trainer_spec["bos_id"], model.trainer_spec["eos_id"], model.trainer_spec["pad_id"]) == (0, 1, 2, -1)
    assert model.normalizer_spec == {"name": "identity", "add_dummy_prefix": True,
                                     "remove_extra_whitespaces": False, "escape_whitespaces": True}  # fmt: skip
    # to_bytes writes a model sentencepiece loads, encoding identically
    sp2 = spm.SentencePieceProcessor()
    sp2.LoadFromSerializedProto(model.to_bytes())
    for text in HARD_CASES:
        assert sp2.encode(text) == sp.encode(text)
    assert SentencePieceModel.from_bytes(model.to_bytes()).pieces == model.pieces
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        SentencePieceModel.from_bytes(b"\xff\xff\xff")
    with pytest.raises(FileNotFoundError):
        SentencePieceModel.from_file(tmp_path / "none.model")


def test_parser_agrees_with_protobuf():
    pb = pytest.importorskip("google.protobuf")  # noqa: F841
    pytest.importorskip("transformers")
    from transformers.utils import sentencepiece_model_pb2_new as model_pb2

    data = find_data_file("llama2-tokenizer.model").read_bytes()
    ref = model_pb2.ModelProto.FromString(data)
    ours = SentencePieceModel.from_bytes(data)
    assert [p.piece for p in ref.pieces] == ours.pieces
    assert [p.score for p in ref.pieces] == ours.scores
    assert [p.type for p in ref.pieces] == ours.types
    edited = model_pb2.ModelProto.FromString(set_add_dummy_prefix(data, False))
    assert edited.normalizer_spec.add_dummy_prefix is False
    assert edited.normalizer_spec.remove_extra_whitespaces is False and edited.trainer_spec == ref.trainer_spec


def test_set_add_dummy_prefix():
    data = find_data_file("llama2-tokenizer.model").read_bytes()
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(set_add_dummy_prefix(data, False))
    assert sp.encode("Hello", out_type=str) == ["Hello"]  # no "▁" in front any more (10994, not 15043)
    assert sp.encode(" Hello", out_type=str) == ["▁Hello"]
    assert SentencePieceModel.from_bytes(set_add_dummy_prefix(data, False)).normalizer_spec["add_dummy_prefix"] is False
    assert SentencePieceModel.from_bytes(set_add_dummy_prefix(set_add_dummy_prefix(data, False), True)).normalizer_spec[
        "add_dummy_prefix"
    ] is True


# ---------------------------------------------------------------------------------------------
# the from-scratch trainer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(shakespeare):
    return train_bpe(shakespeare[:200_000], vocab_size=600)


def test_trainer_vocabulary_layout(trained):
    tok = trained.tokenizer
    assert len(tok) == 600
    assert tok.pieces[:3] == ["<unk>", "<s>", "</s>"]
    assert tok.pieces[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert len(set(tok.pieces)) == 600  # no duplicates
    assert all(len(p) <= 16 for p in tok.pieces[259:])
    # merged pieces come first, in merge order, with decreasing scores
    merged = [a + b for a, b in trained.merges]
    assert tok.pieces[259 : 259 + len(merged)] == merged
    assert tok.scores[259:] == sorted(tok.scores[259:], reverse=True)
    # digits are never merged (split_digits) and no piece spans two words
    assert not any(any(c.isdigit() for c in p) and len(p) > 1 for p in tok.pieces[259:])
    assert not any("▁" in p[1:] and p.strip("▁") for p in tok.pieces[259:])


def test_trainer_merges_most_frequent_pair_first(shakespeare, trained):
    words = pre_split(shakespeare[:200_000])
    pairs: Counter = Counter()
    for w, c in words.items():
        for a, b in zip(w, w[1:]):
            pairs[a, b] += c
    best, count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
    assert trained.merges[0] == best and trained.merge_counts[0] == count
    assert best == ("▁", "t")  # the most common pair in English: a space then 't' (the, to, thou, ...)
    # the count of the merged pair never increases from one merge to the next
    assert all(a >= b for a, b in zip(trained.merge_counts, trained.merge_counts[1:]))
    assert "▁the" in trained.tokenizer.pieces and "▁and" in trained.tokenizer.pieces


def test_trained_vocabulary_roundtrips_and_compresses(shakespeare, trained):
    tok = trained.tokenizer
    held_out = shakespeare[-50_000:].split("\n")
    n_tokens = n_chars = 0
    for text in held_out + HARD_CASES:
        if "▁" in text:
            continue  # '▁' in the input reads as a space, as in sentencepiece
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        n_tokens += len(ids)
        n_chars += len(text)
    assert n_tokens < 0.6 * n_chars  # 600 pieces: ~1.9 characters per token (raw bytes would be 1)


def test_trained_vocabulary_loads_in_sentencepiece(trained, lines):
    tok = trained.tokenizer
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(tok.to_model().to_bytes())
    assert sp.vocab_size() == len(tok)
    for text in lines[:1000] + HARD_CASES:
        assert sp.encode(text) == tok.encode(text), text
    # and the Llama tokenizer classes accept it
    from llama_edu.tokenizer import LlamaTokenizer

    assert LlamaTokenizer.__name__  # (see test_tokenizer.py for the classes themselves)


def test_trainer_errors():
    with pytest.raises(ValueError, match="empty"):
        train_bpe("", vocab_size=300)
    with pytest.raises(ValueError, match="too small"):
        train_bpe("hello world", vocab_size=100)
    small = train_bpe("ab ab ab", vocab_size=270)  # fewer merges possible than asked: stops early
    assert small.tokenizer.decode(small.tokenizer.encode("ab ab")) == "ab ab"


def test_character_coverage_leaves_rare_characters_to_bytes():
    text = "aaaa bbbb aaaa bbbb " * 50 + "z"
    result = train_bpe(text, vocab_size=300, character_coverage=0.99)
    assert "z" not in result.tokenizer.pieces
    assert result.tokenizer.encode_as_pieces("z") == ["▁", "<0x7A>"]


# ---------------------------------------------------------------------------------------------
# the sentencepiece trainer with Llama 2's settings
# ---------------------------------------------------------------------------------------------


def test_train_sentencepiece_settings(tmp_path, lines):
    text = tmp_path / "small.txt"
    text.write_text("\n".join(lines[:2000]), encoding="utf-8")
    out = tmp_path / "sub" / "t.model"
    data = train_sentencepiece(text, vocab_size=400, output_file=out)
    assert out.read_bytes() == data and [p.name for p in out.parent.iterdir()] == ["t.model"]  # atomic, no leftovers
    assert train_sentencepiece(text, vocab_size=400) == data  # deterministic
    model = SentencePieceModel.from_bytes(data)
    assert len(model.pieces) == 400 and model.pieces[:3] == ["<unk>", "<s>", "</s>"]
    assert model.trainer_spec["model_type"] == 2 and model.trainer_spec["byte_fallback"] is True
    assert model.trainer_spec["split_digits"] is True and model.trainer_spec["pad_id"] == -1
    assert model.normalizer_spec["name"] == "identity" and model.normalizer_spec["add_dummy_prefix"] is True
    assert model.normalizer_spec["remove_extra_whitespaces"] is False
    assert str(tmp_path).encode() not in data  # no machine path stored in the trainer_spec
    bpe = SentencePieceBPE.from_model(model)
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(data)
    for t in lines[2000:2500] + HARD_CASES:
        assert bpe.encode(t) == sp.encode(t)
    with pytest.raises(FileNotFoundError):
        train_sentencepiece(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(text, vocab_size=100)
    assert LLAMA2_TRAINER_SETTINGS["byte_fallback"] and LLAMA2_TRAINER_SETTINGS["split_digits"]


def test_project_tokenizer_is_reproducible(shakespeare):
    """data/tokenizer.model is exactly what scripts/train_tokenizer.py makes."""
    committed = (PROJECT_DATA_DIR / "tokenizer.model").read_bytes()
    rebuilt = train_sentencepiece(find_data_file("tinyshakespeare.txt"), vocab_size=2048)
    assert hashlib.sha256(rebuilt).hexdigest() == hashlib.sha256(committed).hexdigest()
