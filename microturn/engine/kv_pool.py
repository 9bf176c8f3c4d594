"""KV memory that never moves: fixed-size blocks preallocated once from a memory budget.

A session owns a row of the shared block table; growing appends a block id to its row, and
closing returns its blocks to the free list. No tensor holding KV is ever reallocated.

Layouts. Values are [layers, blocks, kv heads, block_size, head_dim] (rows of a block are
slots). Keys are the same, except where the CPU kernels run and block_size is a multiple of 16:
then each block stores its keys as 16-slot panels, [.., block_size / 16, head_dim, 16], the
layout the attention kernel's score tile reads straight from the pool (no gather, no transpose
per forward). In bf16 a panel row keeps slots j and 8 + j in one 32-bit word (the kernel's
widening trick), so slot c sits at column 2 (c % 8) + c // 8; where the CPU has bf16 dot
products (and head_dim is a multiple of 16) a panel instead holds channel pairs,
[head_dim / 2, W, 2] for W = gcd(block_size, 64) slots, which vdpbf16ps multiplies two channels
at a time: the score tile's four 16-slot panels are then one contiguous row per channel pair.
"""

import math
from dataclasses import dataclass

import torch

from microturn.errors import MicroturnError
from microturn.kernels import ops
from microturn.kernels.huge_pages import huge_page_bytes
from microturn.model.config import ModelConfig

PANEL = 16


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeroed KV memory. On the CPU it sits on huge pages: a decode step reads each block's keys
    and values in runs of ~100 KiB (all kv heads side by side), which on 4 KiB pages cost a TLB
    miss and a restart of the prefetcher every page. Written once here, as torch.zeros would:
    mapping a huge page when a session first reaches it stalls that engine tick."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return huge_page_bytes(math.prod(shape) * dtype.itemsize).view(dtype).view(shape).zero_()


@dataclass(frozen=True)
class PoolStats:
    blocks_total: int
    blocks_free: int
    block_bytes: int

    @property
    def blocks_in_use(self) -> int:
        return self.blocks_total - self.blocks_free

    @property
    def bytes_in_use(self) -> int:
        return self.blocks_in_use * self.block_bytes

    @property
    def bytes_total(self) -> int:
        return self.blocks_total * self.block_bytes


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
        kernels = ops.kernels_for(torch.empty(0, device=device))
        self.panel_keys = block_size % PANEL == 0 and kernels is not None
        self.pair_channels = (self.panel_keys and dtype == torch.bfloat16
                              and kernels.dot_attention(config.head_dim))
        self.key_width = kernels.key_panel_slots(block_size, True) if self.pair_channels \
            else PANEL
        key_shape = shape[:3] + (block_size // self.key_width, config.head_dim, self.key_width) \
            if self.panel_keys else shape
        self.k = _zeros(key_shape, dtype, device)
        self.v = _zeros(shape, dtype, device)
        column = torch.arange(PANEL)
        self._column = (2 * (column % 8) + column // 8) if dtype == torch.bfloat16 else column
        # row r lists session r's blocks in order; -1 marks unused entries
        self.block_table = torch.full((max_sessions, max_blocks_per_session), -1,
                                      dtype=torch.int32, device=device)
        # on the CPU a numpy view of the same memory (no copy per step)
        self._host_table = self.block_table.numpy() if self.block_table.is_cpu else None
        self.free_blocks = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out 0, 1, ...
        self.free_rows = list(range(max_sessions - 1, -1, -1))

    def write(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store K/V [N, kv heads, head_dim] of N tokens at (block, offset), in place."""
        if kernels := ops.kernels_for(k):
            kernels.paged_write_(self.k[layer], self.v[layer], k, v, blocks, offsets)
            return
        self.v[layer, blocks, :, offsets] = v
        if self.pair_channels:
            raise MicroturnError("kv pool: channel-pair key panels are written by the kernels")
        if self.panel_keys:
            self.k[layer, blocks, :, offsets // PANEL, :, self._column[offsets % PANEL]] = k
        else:
            self.k[layer, blocks, :, offsets] = k

    def keys(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """Keys of the given blocks in slot order, [len(blocks), kv heads, block_size, dim]."""
        k = self.k[layer, blocks]
        if not self.panel_keys:
            return k
        if self.pair_channels:  # [n, heads, panels, dim / 2, width, 2] -> slot order
            n, heads, panels, dim, width = k.shape
            k = k.view(n, heads, panels, dim // 2, width, 2).permute(0, 1, 2, 4, 3, 5)
            return k.reshape(n, heads, panels * width, dim)
        k = k[..., self._column]  # [n, heads, panels, dim, 16] in slot order
        return k.transpose(-1, -2).flatten(2, 3)

    def host_table(self):
        """The block table as a numpy array on the host (batch metadata is built there)."""
        if self._host_table is not None:
            return self._host_table
        return self.block_table.cpu().numpy()

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

    def drop(self, row: int, num_blocks: int, start: int, count: int) -> None:
        """Free `count` blocks of a row that holds `num_blocks`, from index `start` on; the
        blocks after them move up (the row's table entries only: no KV moves)."""
        table = self.block_table[row]
        end = start + count
        self.free_blocks += table[start:end].tolist()
        table[start:num_blocks - count] = table[end:num_blocks].clone()
        table[num_blocks - count:num_blocks] = -1

    def compact(self, row: int, num_blocks: int, start: int, count: int,
                offsets: torch.Tensor) -> None:
        """Keep the slots at `offsets` (in order; a whole number of blocks) of the `count`
        blocks from index `start` of a row, packed into the first of those blocks, and free
        the rest. KV is copied bit for bit: kept keys keep their rotary positions."""
        bs = self.block_size
        region = self.block_table[row, start:start + count].long()
        keep = len(offsets) // bs
        blocks = region[:keep].repeat_interleave(bs)
        at = torch.arange(bs).repeat(keep)
        for layer in range(self.v.shape[0]):  # read whole, then write: the regions overlap
            k = self.keys(layer, region).transpose(1, 2).flatten(0, 1)[offsets]
            v = self.v[layer, region].transpose(1, 2).flatten(0, 1)[offsets]
            self.write(layer, blocks, at, k.contiguous(), v.contiguous())
        self.drop(row, num_blocks, start + keep, count - keep)

    def stats(self) -> PoolStats:
        return PoolStats(self.num_blocks, len(self.free_blocks), self.block_bytes)

    def release(self, row: int, num_blocks: int) -> None:
        self.free_blocks += self.block_table[row, :num_blocks].tolist()
        self.block_table[row, :num_blocks] = -1
        self.free_rows.append(row)
