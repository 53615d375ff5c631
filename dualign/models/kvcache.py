"""A key/value cache that writes in place into buffers sized once for the whole decode.

transformers' `DynamicCache` grows every layer's keys and values by concatenation: each decoding
step copies the whole cache of every layer (on CPU, 12% of the demo's sample stage). `StaticCache`
writes in place, but hands attention the full preallocated length every step (masked), so short
contexts pay for the longest one. `BufferCache` does neither: each layer owns one buffer of
`capacity` positions, new keys and values are copied into the next free slots, and attention sees
a view of the filled part only, so the model runs the same computation as with `DynamicCache`.

Imported lazily (it needs torch and transformers at import time).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class BufferLayer(DynamicLayer):
    """One layer's keys and values, shape (batch, heads, capacity, head_dim), filled left to right.

    `keys` / `values` (what attention reads) are views of the first `length` positions: the
    same values, shapes and semantics as `DynamicLayer`'s concatenated tensors (mask sizes,
    sequence length), only not contiguous across rows.

    Parameters
    ----------
    capacity : int >= 1
        Positions the buffers hold: the prompt length plus the tokens to generate.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # allocated at the first update: heads, head size, dtype and device come from the model
        b, h, _, dk = key_states.shape
        self.device = key_states.device
        self._k = key_states.new_empty((b, h, self.capacity, dk))
        self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        self.length = 0
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Copy the new positions into the buffers; return the keys and values so far.

        Raises
        ------
        ValueError
            More positions than `capacity` (the caller sized the cache too small).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions asked for, capacity {self.capacity}")
        self._k[:, :, self.length:end].copy_(key_states)
        self._v[:, :, self.length:end].copy_(value_states)
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` positions (a negative int, as `DynamicLayer`)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of positions; got {tokens_to_remove}")
        if self.is_initialized and tokens_to_remove:
            self.length = max(0, self.length + tokens_to_remove)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (in that order): one copy of the kept rows' buffers."""
        if self.is_initialized:
            self._k = self._k.index_select(0, indices.to(self._k.device))
            self._v = self._v.index_select(0, indices.to(self._v.device))
            self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._views()


class BufferCache(Cache):
    """A `Cache` of `BufferLayer`s, one per model layer (added as the model's layers update it).

    Parameters
    ----------
    capacity : int >= 1
        Positions every layer holds (prompt + new tokens).
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1; got {capacity}")
        super().__init__(layer_class_to_replicate=lambda: BufferLayer(capacity))
        self.capacity = int(capacity)
