"""The KV pool: one preallocated tensor holding every layer's key/value blocks.

Layout `[layers, 2, num_blocks, block_size, kv_heads, head_dim]`: `pool[l, 0]` and `pool[l, 1]` are
layer l's key and value caches, each `[num_blocks, block_size, kv_heads, head_dim]`, and a slot
`block_id * block_size + offset` addresses one token of one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """Key + value bytes of one token across all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size


def free_device_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return free


class KVPool:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device | str = "cpu"):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got num_blocks={num_blocks}")
        self.layout = layout
        self.num_blocks = num_blocks
        # Zeroed, so that padding rows of a captured decode step read finite values.
        self.tensor = torch.zeros(
            (layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim),
            dtype=layout.dtype,
            device=device,
        )

    @staticmethod
    def blocks_for_budget(layout: KVLayout, budget_bytes: int) -> int:
        return int(budget_bytes) // layout.bytes_per_block

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s (key cache, value cache), views of the pool."""
        return self.tensor[index, 0], self.tensor[index, 1]

    def write(self, index: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """Write new tokens' key/value `[T, kv_heads, head_dim]` into `slots` `[T]` of layer `index`."""
        k_cache, v_cache = self.layer(index)
        heads, dim = self.layout.num_kv_heads, self.layout.head_dim
        k_cache.view(-1, heads, dim).index_copy_(0, slots, key.to(k_cache.dtype))
        v_cache.view(-1, heads, dim).index_copy_(0, slots, value.to(v_cache.dtype))

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole blocks src[i] -> dst[i] in every layer, keys and values, in one batched op."""
        if src.numel():
            self.tensor[:, :, dst] = self.tensor[:, :, src]
