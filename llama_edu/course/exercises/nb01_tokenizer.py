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
        ('multi-character symbols ["xa", "b"]', (["xa", "b"], ("a", "b"))),
        ("symbols that are spaces", (["a", " ", "b", " ", "b"], (" ", "b"))),
        ("one symbol", (["x"], ("x", "y"))),
        ("no symbols", ([], ("a", "b"))),
    ]


def _merge_by_string_replace(symbols, pair):
    return " ".join(symbols).replace(" ".join(pair), "".join(pair)).split(" ") if symbols else []


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


register(
    "merge_pair", "01_tokenizer", "(symbols, pair)",
    "replace every non-overlapping occurrence of the pair, left to right, by the joined symbol",
    reference=merge_pair,
    cases=_merge_pair_cases,
    mistakes=[
        (_merge_by_string_replace,
         "you merged on the joined string: in ['xa', 'b'] the text 'a b' appears although no symbol is 'a', and symbols that are spaces break the split",
         "walk the list of symbols and compare whole symbols: (symbols[i], symbols[i + 1]) == pair"),
        (_merge_first_only, "only the first occurrence is merged", "keep going after a merge until the end of the list"),
        (_merge_right_to_left, "you scan from the right: in ['a', 'a', 'a'] the merge must take the first two",
         "go left to right, and after a merge jump over both symbols (i += 2)"),
        (_merge_no_skip, "after a merge you do not jump over the second symbol, so runs like ['a', 'a', 'a'] merge overlapping pairs",
         "after appending the merged symbol, advance by 2"),
    ],
)
