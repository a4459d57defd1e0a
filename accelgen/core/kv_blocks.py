"""KV-cache block accounting: the scheduler's allocator for one worker's physical block pool.

The worker's KV memory is a pool of fixed-size blocks; this class decides which request owns
which block. Because the scheduler, not the worker, allocates, a worker can be replaced at any
time and the scheduler's tables still say exactly what lives where.

Block id 0 is never handed out: vLLM reserves it as the null block for padding.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` KV entries: ceil(num_tokens / block_size)."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return -(-num_tokens // block_size)


@dataclass(frozen=True, slots=True)
class KVUsage:
    total_blocks: int  # usable blocks (the reserved null block excluded)
    used_blocks: int

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks

    @property
    def utilisation(self) -> float:
        return self.used_blocks / self.total_blocks if self.total_blocks else 0.0


class KVBlockManager:
    """Per-request block tables over a free pool. "Cannot" is a return value (``None``)."""

    NULL_BLOCK_ID = 0

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))
        self._tables: dict[str, list[int]] = {}

    # -- queries -------------------------------------------------------------------------
    @property
    def total_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.total_usable_blocks - len(self._free)

    def usage(self) -> KVUsage:
        return KVUsage(total_blocks=self.total_usable_blocks, used_blocks=self.num_used_blocks)

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's table (callers must not mutate the live one)."""
        return list(self._tables.get(request_id, ()))

    def num_blocks_of(self, request_id: str) -> int:
        table = self._tables.get(request_id)
        return len(table) if table else 0

    def owners(self) -> dict[str, list[int]]:
        return {rid: list(t) for rid, t in self._tables.items()}

    def blocks_to_grow(self, request_id: str, num_tokens: int) -> int:
        """New blocks the request needs so that ``num_tokens`` KV entries fit."""
        return max(0, blocks_for_tokens(num_tokens, self.block_size) - self.num_blocks_of(request_id))

    def can_allocate(self, request_id: str, num_tokens: int, reserve_blocks: int = 0) -> bool:
        return self.blocks_to_grow(request_id, num_tokens) + reserve_blocks <= len(self._free)

    # -- actions -------------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int, reserve_blocks: int = 0) -> list[int] | None:
        """Grow the request's table to hold ``num_tokens`` entries; return the new block ids.

        Returns ``None`` (and changes nothing) when the blocks do not fit while keeping
        ``reserve_blocks`` free. Returns ``[]`` when the table is already large enough.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        # blocks_to_grow, inlined: this runs for every scheduled request on every iteration.
        table = self._tables.get(request_id)
        need = -(-num_tokens // self.block_size) - (len(table) if table is not None else 0)
        if need < 0:
            need = 0
        free = self._free
        if need + reserve_blocks > len(free):
            return None
        if table is None:
            table = self._tables[request_id] = []
        if need == 0:
            return []
        new = [free.popleft() for _ in range(need)]
        table.extend(new)
        return new

    def free(self, request_id: str) -> list[int]:
        """Release every block of the request; returns them (empty if it owned none)."""
        table = self._tables.pop(request_id, None)
        if not table:
            return []
        # Freed blocks go to the back: recently used blocks are reused last, which keeps a
        # just-finished request's blocks intact a little longer for debugging on the worker.
        self._free.extend(table)
        return table

    def check_invariants(self) -> None:
        """No block owned twice, none both owned and free, none lost, block 0 never handed out."""
        owned = [b for table in self._tables.values() for b in table]
        owned_set = set(owned)
        free_set = set(self._free)
        if len(owned) != len(owned_set):
            raise AssertionError("a block is owned by two requests")
        if len(free_set) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        if owned_set & free_set:
            raise AssertionError("a block is both owned and free")
        if self.NULL_BLOCK_ID in owned_set or self.NULL_BLOCK_ID in free_set:
            raise AssertionError("the reserved null block was handed out")
        if len(owned_set) + len(free_set) != self.total_usable_blocks:
            raise AssertionError("free + used != total: a block leaked")
