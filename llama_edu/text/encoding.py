"""``BatchEncoding``: what a tokenizer's ``__call__`` returns (a dict of ids and masks, with attribute
access), and turning its lists into tensors; the checks on what goes in (text that is UTF-8) and
comes back (ids that are integers)."""

from __future__ import annotations

import numbers
from typing import Any, Iterable

import torch


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


def check_text(text: str, what: str = "the text") -> str:
    """``text``, or a ValueError when it holds lone surrogates: bytes that were not valid UTF-8,
    kept by Python's ``surrogateescape`` (a command-line argument, a terminal's input). The
    tokenizers cannot encode them (sentencepiece fails deep inside with a cryptic error)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"lone surrogate {bad!r}"
        raise ValueError(f"{what} is not valid UTF-8 ({byte} at character {e.start}): pass UTF-8 text "
                         "(check the terminal's or the file's encoding)") from None
    return text


def as_token_ids(ids: Any, what: str = "decode") -> list[int]:
    """A sequence of token ids as Python ints; a float (``3.7``), a bool, a string or a
    floating-point tensor is refused rather than truncated (``int(3.7)`` would decode id 3)."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{what} takes integer token ids, got a {ids.dtype} tensor; pass a torch.long tensor "
                             "(e.g. the argmax of the logits, not the logits or probabilities)")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{what} takes token ids, got the text {ids!r}; encode text with tokenizer(text) or tokenizer.encode")
    out = []
    for i in ids if isinstance(ids, Iterable) else [ids]:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise ValueError(f"{what} takes integer token ids, got {i!r} ({type(i).__name__}); "
                             "a float id is not rounded or truncated: pass ints (e.g. ids.long().tolist())")
        out.append(int(i))
    return out
