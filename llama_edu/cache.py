"""Key/value caches for incremental decoding.

Generating token t+1 only needs the new token's query; the keys and values of tokens 0..t
do not change, so each layer keeps them. A cache stores, per layer, keys *after* RoPE and
*before* the grouped-query repeat: (batch, num_key_value_heads, seq, head_dim). Storing the
un-repeated heads is exactly the memory saving of GQA/MQA.

- :class:`DynamicCache` grows by concatenation: simple, any length, the default.
- :class:`StaticCache` preallocates ``max_cache_len`` positions and writes in place: no
  reallocation per token, fixed shapes (what torch.compile / CUDA graphs want).

Both speak the transformers ``Cache`` protocol: ``update(key, value, layer_idx)`` returns the
whole keys/values so far, ``get_seq_length()``; the "legacy" format is a tuple of
``(key, value)`` pairs, one per layer.
"""

from __future__ import annotations

import torch

LegacyCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class Cache:
    """Base class: what the attention layers call."""

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError

    def get_max_length(self) -> int | None:
        return None

    def get_usable_length(self, new_seq_length: int, layer_idx: int = 0) -> int:
        """How many cached positions the next ``new_seq_length`` tokens can attend to."""
        return self.get_seq_length(layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError


class DynamicCache(Cache):
    """A cache that grows with each forward call (``torch.cat`` along the sequence)."""

    def __init__(self) -> None:
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value (batch, kv_heads, new, head_dim) and return all of them so far."""
        if layer_idx == len(self.key_cache):
            self.key_cache.append(key)
            self.value_cache.append(value)
        elif layer_idx < len(self.key_cache):
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value], dim=-2)
        else:
            raise ValueError(f"layer {layer_idx} updated before layer {len(self.key_cache)}; layers must run in order")
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key_cache[layer_idx].shape[-2] if layer_idx < len(self.key_cache) else 0

    def __len__(self) -> int:
        return len(self.key_cache)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def __iter__(self):
        return iter(zip(self.key_cache, self.value_cache))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep rows ``beam_idx`` of the batch (beam search, or dropping finished rows)."""
        self.key_cache = [k.index_select(0, beam_idx.to(k.device)) for k in self.key_cache]
        self.value_cache = [v.index_select(0, beam_idx.to(v.device)) for v in self.value_cache]

    def to_legacy_cache(self) -> LegacyCache:
        return tuple(zip(self.key_cache, self.value_cache))

    @classmethod
    def from_legacy_cache(cls, past_key_values: LegacyCache | None) -> "DynamicCache":
        cache = cls()
        for layer_idx, (key, value) in enumerate(past_key_values or ()):
            cache.update(key, value, layer_idx)
        return cache


class StaticCache(Cache):
    """A preallocated cache of ``max_cache_len`` positions per layer, written in place.

    ``update`` returns views of the filled prefix, so attention costs what it would with a
    dynamic cache while no memory is allocated per generated token.
    """

    def __init__(
        self,
        config,
        max_batch_size: int,
        max_cache_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (max_batch_size, config.num_key_value_heads, max_cache_len, config.head_dim)
        self.max_batch_size = max_batch_size
        self.max_cache_len = max_cache_len
        self.key_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.value_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.seen = [0] * config.num_hidden_layers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, new = self.seen[layer_idx], key.shape[-2]
        end = start + new
        if end > self.max_cache_len:
            raise ValueError(
                f"StaticCache holds {self.max_cache_len} positions but {end} are needed; "
                "create it with a larger max_cache_len (prompt length + max_new_tokens)"
            )
        if key.shape[0] != self.max_batch_size:
            raise ValueError(f"StaticCache was made for batch size {self.max_batch_size}, got {key.shape[0]}")
        self.key_cache[layer_idx][:, :, start:end] = key
        self.value_cache[layer_idx][:, :, start:end] = value
        self.seen[layer_idx] = end
        return self.key_cache[layer_idx][:, :, :end], self.value_cache[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen[layer_idx]

    def get_max_length(self) -> int | None:
        return self.max_cache_len

    def __len__(self) -> int:
        return len(self.key_cache)

    def reset(self) -> None:
        """Forget everything (the memory is kept for the next prompt)."""
        self.seen = [0] * len(self.seen)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for i in range(len(self.key_cache)):
            self.key_cache[i] = self.key_cache[i].index_select(0, beam_idx.to(self.key_cache[i].device))
            self.value_cache[i] = self.value_cache[i].index_select(0, beam_idx.to(self.value_cache[i].device))
        self.max_batch_size = self.key_cache[0].shape[0]
