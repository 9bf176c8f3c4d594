"""KV memory that never moves: fixed-size blocks preallocated once from a memory budget.

A session owns a row of the shared block table; growing appends a block id to its row, and
closing returns its blocks to the free list. No tensor holding KV is ever reallocated.
"""

import torch

from microturn.errors import MicroturnError
from microturn.model.config import ModelConfig


class KVPool:
    def __init__(self, config: ModelConfig, budget_bytes: int, block_size: int,
                 max_sessions: int, max_blocks_per_session: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if block_size <= 0 or max_sessions <= 0:
            raise MicroturnError("kv pool: block_size and max_sessions must be > 0")
        self.block_size = block_size
        self.block_bytes = (2 * config.num_layers * config.num_kv_heads * block_size
                            * config.head_dim * dtype.itemsize)
        self.num_blocks = budget_bytes // self.block_bytes
        if self.num_blocks < 1:
            raise MicroturnError(f"kv pool: a budget of {budget_bytes / 2**20:.1f} MiB holds no "
                                 f"block of {self.block_bytes / 2**20:.2f} MiB")
        shape = (config.num_layers, self.num_blocks, config.num_kv_heads, block_size,
                 config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # row r lists session r's blocks in order; -1 marks unused entries
        self.block_table = torch.full((max_sessions, max_blocks_per_session), -1,
                                      dtype=torch.int32, device=device)
        self.free_blocks = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out 0, 1, ...
        self.free_rows = list(range(max_sessions - 1, -1, -1))

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def take_row(self) -> int | None:
        return self.free_rows.pop() if self.free_rows else None

    def grow(self, row: int, have_blocks: int) -> bool:
        """Append one block to a row's table; False when the pool or the row is full."""
        if not self.free_blocks or have_blocks >= self.block_table.shape[1]:
            return False
        self.block_table[row, have_blocks] = self.free_blocks.pop()
        return True

    def release(self, row: int, num_blocks: int) -> None:
        self.free_blocks += self.block_table[row, :num_blocks].tolist()
        self.block_table[row, :num_blocks] = -1
        self.free_rows.append(row)
