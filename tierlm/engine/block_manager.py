"""Owner of the paged KV cache's blocks: a free list and reference counts. No torch.

Invariants:
  * block 0 is the null block (zero-filled padding target); it is never allocated;
  * a block is in the free list iff its reference count is 0;
  * a request's block table is append-only while it runs and covers exactly
    ceil(num_computed_tokens_after_step / block_size) blocks;
  * allocation takes from the front of the free list and freeing puts a table's blocks back at the
    front in table order, so which ids a request gets is a deterministic function of the call
    sequence, and the most recently freed blocks are reused first.

Why most recently freed first: the cache's tensors are allocated without touching their pages
(tierlm.model.attention.KVCache), and the first write to a page costs a page fault, which under
this machine's hypervisor made writing a 36-token step's K/V about 10x slower than writing to
pages already mapped (36-180 us against 15-18 us per layer and tensor, SmolLM2 float32). Taking
blocks in id order, as this did before, walked through the whole cache before reusing any page,
so a server faulted on every KV write until it had written its whole cache once (65,536 tokens by
default: minutes of serving). Reusing the last freed blocks keeps the pages touched to the most
the cache has held at once, and those pages are the likeliest still in the CPU's caches.
Reference counts exist so that blocks can later be shared (prefix caching, forked sequences).
"""

from __future__ import annotations

from collections import deque

NULL_BLOCK = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        """``num_blocks`` includes the null block, so ``num_blocks - 1`` are usable."""
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (1 usable), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(1, num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - len(self.free_blocks)

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """How many new blocks a table needs to hold ``num_tokens`` tokens in total."""
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def can_allocate(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(block_table, num_tokens) <= len(self.free_blocks)

    def allocate(self, block_table: list[int], num_tokens: int) -> list[int] | None:
        """Grow ``block_table`` in place to hold ``num_tokens``; returns the new block ids, or None
        (and changes nothing) when there are not enough free blocks."""
        need = self.blocks_needed(block_table, num_tokens)
        if need > len(self.free_blocks):
            return None
        new = [self.free_blocks.popleft() for _ in range(need)]
        for b in new:
            self.ref_counts[b] = 1
        block_table.extend(new)
        return new

    def free(self, block_table: list[int]) -> None:
        """Drop one reference to each block of the table and empty the table."""
        for b in reversed(block_table):  # tail first, each to the front: the table's order is kept
            if b == NULL_BLOCK or self.ref_counts[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_blocks.appendleft(b)
        block_table.clear()
