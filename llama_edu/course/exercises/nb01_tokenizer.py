"""Exercises of notebook 01_tokenizer."""

from __future__ import annotations

from ...text.bpe import merge_pair

from .checking import Cases, register


def _merge_pair_cases() -> Cases:
    return [
        ("a word start", (["▁", "t", "h", "e"], ("▁", "t"))),
        ("odd run of a pair", (["a", "a", "a"], ("a", "a"))),
        ("even run of a pair", (["a", "a", "a", "a"], ("a", "a"))),
        ("two occurrences", (["▁t", "h", "e", "▁t", "h"], ("▁t", "h"))),
        ("three occurrences, the last at the end", (["a", "b", "x", "a", "b", "x", "a", "b"], ("a", "b"))),
        ('multi-character symbols ["xa", "b"]', (["xa", "b"], ("a", "b"))),
        ('["ab", "c"] does not hold the pair ("a", "bc")', (["ab", "c", "a", "bc"], ("a", "bc"))),
        ("symbols that are spaces", (["a", " ", "b", " ", "b"], (" ", "b"))),
        ("one symbol", (["x"], ("x", "y"))),
        ("no symbols", ([], ("a", "b"))),
    ]


def _merge_by_string_replace(symbols, pair):
    return " ".join(symbols).replace(" ".join(pair), "".join(pair)).split(" ") if symbols else []


def _merge_by_concatenation(symbols, pair):
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] + symbols[i + 1] == pair[0] + pair[1]:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _merge_first_only(symbols, pair):
    for i in range(len(symbols) - 1):
        if (symbols[i], symbols[i + 1]) == tuple(pair):
            return symbols[:i] + [pair[0] + pair[1]] + symbols[i + 2:]
    return list(symbols)


def _merge_right_to_left(symbols, pair):
    merged, i = [], len(symbols) - 1
    while i >= 0:
        if i - 1 >= 0 and (symbols[i - 1], symbols[i]) == tuple(pair):
            merged.insert(0, pair[0] + pair[1])
            i -= 2
        else:
            merged.insert(0, symbols[i])
            i -= 1
    return merged


def _merge_no_skip(symbols, pair):
    merged = []
    for i, s in enumerate(symbols):
        if i + 1 < len(symbols) and (s, symbols[i + 1]) == tuple(pair):
            merged.append(pair[0] + pair[1])
        elif not (i > 0 and (symbols[i - 1], s) == tuple(pair)):
            merged.append(s)
    return merged


def _merge_variant(symbols, pair, joined=lambda p: p[0] + p[1], last=True, tail=True):
    merged, i = [], 0
    end = len(symbols) - 1 if last else len(symbols) - 2
    while i < end:
        if (symbols[i], symbols[i + 1]) == tuple(pair):
            merged.append(joined(pair))
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    if tail or not last:
        merged.extend(symbols[i:])
    return merged


register(
    "merge_pair", "01_tokenizer", "(symbols, pair)",
    "replace every non-overlapping occurrence of the pair, left to right, by the joined symbol",
    reference=merge_pair,
    cases=_merge_pair_cases,
    mistakes=[
        (_merge_by_string_replace,
         "you merged on the joined string: in ['xa', 'b'] the text 'a b' appears although no symbol is 'a', and symbols that are spaces break the split",
         "walk the list of symbols and compare whole symbols: (symbols[i], symbols[i + 1]) == pair"),
        (_merge_by_concatenation,
         "you compare the concatenation symbols[i] + symbols[i + 1] with the joined pair: 'ab' + 'c' equals 'a' + 'bc' although the symbols differ",
         "compare whole symbols: (symbols[i], symbols[i + 1]) == tuple(pair)"),
        (_merge_first_only, "only the first occurrence is merged", "keep going after a merge until the end of the list"),
        (_merge_right_to_left, "you scan from the right: in ['a', 'a', 'a'] the merge must take the first two",
         "go left to right, and after a merge jump over both symbols (i += 2)"),
        (_merge_no_skip, "after a merge you do not jump over the second symbol, so runs like ['a', 'a', 'a'] merge overlapping pairs",
         "after appending the merged symbol, advance by 2"),
        (lambda s, p: _merge_variant(s, p, joined=lambda p: p[1] + p[0]), "the merged symbol is pair[1] + pair[0]: the order of the pair is reversed",
         "join in order: pair[0] + pair[1]"),
        (lambda s, p: _merge_variant(s, p, joined=tuple), "the merged symbol is the pair itself (a tuple), not the joined string",
         "append pair[0] + pair[1] (or ''.join(pair))"),
        (lambda s, p: _merge_variant(s, p, last=False), "the last pair is never looked at (off by one in the loop bound)",
         "a pair starts at every i with i + 1 < len(symbols): loop while i < len(symbols) - 1, then copy what is left"),
        (lambda s, p: _merge_variant(s, p, tail=False), "the last symbol is dropped when it is not part of a merge (off by one: the loop stops before it)",
         "after the loop, append the symbol that is left (or loop while i < len(symbols))"),
    ],
)
