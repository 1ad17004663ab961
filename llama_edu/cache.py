"""Key/value caches for incremental decoding.

Generating token t+1 only needs the new token's query; the keys and values of tokens 0..t do
not change, so each layer keeps them. A cache stores, per layer, keys *after* RoPE and *before*
the grouped-query repeat: (batch, num_key_value_heads, seq, head_dim). Storing the un-repeated
heads is exactly the memory saving of GQA/MQA.

Both speak transformers' ``Cache`` protocol: ``update(key, value, layer_idx, cache_position)``
stores the new keys/values and returns what attention reads; ``get_seq_length()`` counts tokens.

- :class:`DynamicCache` grows by concatenation: simple, any length, one allocation per token.
- :class:`StaticCache` preallocates ``max_cache_len`` slots and writes token t into slot t
  (``cache_position``). It returns the whole buffers every time; the causal mask hides the slots
  not written yet (slot > position). Shapes never change, so ``torch.compile`` and CUDA graphs
  compile one decode step for every position (gpt-fast's ``KVCache``). With ``trim=True``
  (eager decoding on a CPU) it returns only the slots written so far, as a growing cache would.
"""

from __future__ import annotations

import torch

LegacyCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class Cache:
    """Base class: what the attention layers call."""

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_position: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError

    def get_max_length(self) -> int | None:
        return None


class DynamicCache(Cache):
    """A cache that grows with each forward call (``torch.cat`` along the sequence)."""

    def __init__(self) -> None:
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []

    def update(self, key, value, layer_idx, cache_position=None):
        """Append key/value (batch, kv_heads, new, head_dim); return all of them so far."""
        if layer_idx == len(self.key_cache):
            self.key_cache.append(key)
            self.value_cache.append(value)
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value], dim=-2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key_cache[layer_idx].shape[-2] if layer_idx < len(self.key_cache) else 0

    def __len__(self) -> int:
        return len(self.key_cache)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def __iter__(self):
        return iter(zip(self.key_cache, self.value_cache))

    def to_legacy_cache(self) -> LegacyCache:
        """transformers' older format: a tuple of (key, value) pairs, one per layer."""
        return tuple(zip(self.key_cache, self.value_cache))

    @classmethod
    def from_legacy_cache(cls, past_key_values: LegacyCache | None) -> "DynamicCache":
        cache = cls()
        for key, value in past_key_values or ():
            cache.key_cache.append(key)
            cache.value_cache.append(value)
        return cache


class StaticCache(Cache):
    """``max_cache_len`` preallocated slots per layer; token t is written into slot t.

    ``trim=True``: attention reads the slots up to the newest token only, not all
    ``max_cache_len``: fewer keys, and no mask to hide the unwritten slots. The price is reading
    the newest position as a number once per forward (:meth:`keys_length`): free on a CPU, a
    host sync on a GPU, and a shape that changes every step, which compiled code cannot have.
    ``generate`` trims when it decodes eagerly on a CPU.
    """

    trim = False  # class default: a subclass that builds its own buffers (batching's SlotView) keeps whole buffers

    def __init__(
        self,
        config,
        max_batch_size: int,
        max_cache_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        trim: bool = False,
    ) -> None:
        shape = (max_batch_size, config.num_key_value_heads, max_cache_len, config.head_dim)
        self.max_batch_size = max_batch_size
        self.max_cache_len = max_cache_len
        self.key_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.value_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        # Tokens written: a tensor, so that compiled code updates it without a host sync.
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.trim = trim
        self.visible = max_cache_len  # slots attention reads in the current forward (see keys_length)

    def keys_length(self, cache_position: torch.Tensor) -> int:
        """How many slots attention reads in the forward writing ``cache_position``: all
        ``max_cache_len``, or with ``trim`` those up to the newest position. The decoder calls
        it once per forward, before the layers' :meth:`update`."""
        self.visible = int(cache_position[-1]) + 1 if self.trim else self.max_cache_len
        return self.visible

    def update(self, key, value, layer_idx, cache_position=None):
        """Write key/value (batch, kv_heads, new, head_dim) at the slots ``cache_position``
        (new,); return the whole buffers (batch, kv_heads, max_cache_len, head_dim), or with
        ``trim`` their first :meth:`keys_length` slots."""
        self.key_cache[layer_idx].index_copy_(2, cache_position, key)
        self.value_cache[layer_idx].index_copy_(2, cache_position, value)
        if layer_idx == 0:
            self.length.copy_(cache_position[-1] + 1)
        if self.trim:
            return self.key_cache[layer_idx][:, :, : self.visible], self.value_cache[layer_idx][:, :, : self.visible]
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.length)

    def get_max_length(self) -> int | None:
        return self.max_cache_len

    def __len__(self) -> int:
        return len(self.key_cache)

    def reset(self) -> None:
        """Start a new sequence in the same memory (old slots are hidden by the mask)."""
        self.length.zero_()
