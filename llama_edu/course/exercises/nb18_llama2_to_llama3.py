"""Notebook 18's exercise: the byte-level BPE merge loop of Llama 3's tokenizer (tiktoken's).

    from llama_edu.exercises import check
    check("llama3_bpe_merge", my_bpe_merge)

The learner writes ``bpe_merge(piece, ranks) -> list[int]``: start from the single bytes of
``piece``, merge the adjacent pair whose concatenation has the lowest rank (leftmost on a tie),
re-scan, repeat; return the ranks (ids) of the parts. The rank tables are small and made up, each
chosen so that one typical mistake gives a different answer.
"""

from __future__ import annotations

from .checking import Cases, register
from ...text.llama3 import bpe_merge

_BYTES = {bytes([b]): b for b in range(256)}  # as in tiktoken: the 256 single bytes come first


def _ranks(*tokens: bytes) -> dict[bytes, int]:
    """The single bytes plus ``tokens`` with ranks 256, 257, ... in the order given."""
    return {**_BYTES, **{t: 256 + i for i, t in enumerate(tokens)}}


def _bpe_merge_cases() -> Cases:
    return [
        ("'abc': two overlapping pairs, the lower rank wins", (b"abc", _ranks(b"bc", b"ab"))),
        ("'abcd': the lowest rank first, then re-scan", (b"abcd", _ranks(b"cd", b"ab", b"bc", b"abcd"))),
        ("'aaa': the same pair twice, the leftmost wins", (b"aaa", _ranks(b"aa"))),
        ("'aaaa': after a merge the new neighbour pair ranks lower", (b"aaaa", _ranks(b"aaa", b"aa"))),
        ("'hello': a chain of merges", (b"hello", _ranks(b"ll", b"he", b"llo", b"hello", b"el"))),
        ("'café' in UTF-8 (é is two bytes)", ("café".encode(), _ranks("é".encode(), b"af", b"caf", "café".encode()))),
        ("'xyz': no pair is a token", (b"xyz", _ranks(b"ab"))),
        ("one byte", (b"x", _ranks(b"xy"))),
        ("empty", (b"", _ranks(b"ab"))),
    ]


def _merge(parts: list[bytes], i: int) -> list[bytes]:
    return parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def _highest_rank(piece, ranks):
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while True:
        found = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not found:
            return [ranks[p] for p in parts]
        parts = _merge(parts, max(found)[1])


def _merge_once(piece, ranks):
    parts = [piece[i:i + 1] for i in range(len(piece))]
    found = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
    if found:
        parts = _merge(parts, min(found)[1])
    return [ranks[p] for p in parts]


def _left_to_right(piece, ranks):
    parts = [piece[i:i + 1] for i in range(len(piece))]
    changed = True
    while changed:
        changed = False
        for i in range(len(parts) - 1):
            if parts[i] + parts[i + 1] in ranks:
                parts, changed = _merge(parts, i), True
                break
    return [ranks[p] for p in parts]


def _rightmost_tie(piece, ranks):
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while True:
        best, best_rank = -1, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_rank is None or r <= best_rank):
                best, best_rank = i, r
        if best < 0:
            return [ranks[p] for p in parts]
        parts = _merge(parts, best)


def _all_occurrences(piece, ranks):
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while True:
        found = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not found:
            return [ranks[p] for p in parts]
        pair = (parts[min(found)[1]], parts[min(found)[1] + 1])
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged


def _unknown_pairs_rank_0(piece, ranks):
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        i = min(range(len(parts) - 1), key=lambda i: (ranks.get(parts[i] + parts[i + 1], 0), i))
        parts = _merge(parts, i)
    return [ranks[p] for p in parts]


def _parts(piece, ranks):
    ids = bpe_merge(piece, ranks)
    inverse = {v: k for k, v in ranks.items()}
    return [inverse[i] for i in ids]


def _ints(piece, ranks):
    parts = list(piece)  # ints, not 1-byte bytes objects
    return [ranks[p] for p in parts]


register(
    "llama3_bpe_merge", "18_llama2_to_llama3", "(piece, ranks)",
    "the ids of one pre-tokenized word: start from its single bytes, repeatedly merge the adjacent pair whose "
    "concatenation has the lowest rank (the leftmost on a tie), until no adjacent pair is in ranks",
    reference=bpe_merge,
    cases=_bpe_merge_cases,
    mistakes=[
        (_highest_rank, "you merge the pair with the highest rank; ranks are merge order, so the lowest rank merges first",
         "take min, not max, over the ranks of the adjacent pairs"),
        (_merge_once, "you merge only once: a merge creates new pairs that may be tokens too",
         "loop: after every merge, look at all adjacent pairs again, until none is in ranks"),
        (_left_to_right, "you merge the first pair (from the left) that is a token, not the one with the lowest rank",
         "compare the ranks of all adjacent pairs and merge the smallest"),
        (_rightmost_tie, "when the same pair occurs twice you merge the last one (`<=`); tiktoken merges the leftmost",
         "update the best pair only on a strictly smaller rank (`<`)"),
        (_all_occurrences, "you merge every occurrence of the best pair at once (Llama 2's merge_pair); byte-level BPE "
         "merges one pair and re-scans, since a merge can make a lower-ranked neighbour pair",
         "merge just the leftmost occurrence, then re-scan all pairs"),
        (_ints, "list(piece) gives ints in Python 3, not 1-byte bytes objects, so nothing can be looked up or joined",
         "split with slices: [piece[i:i + 1] for i in range(len(piece))]"),
        (_unknown_pairs_rank_0, "pairs that are not in ranks are given rank 0 (ranks.get(pair, 0)), so they merge first; only pairs in ranks may merge",
         "consider only the adjacent pairs whose concatenation is in ranks, and stop when there is none"),
        (_parts, "the byte strings of the parts are returned; the exercise wants their ids", "return [ranks[part] for part in parts]"),
    ],
)
