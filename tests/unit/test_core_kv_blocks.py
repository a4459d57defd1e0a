"""Behavioural tests of the KV block allocator (accelgen/core/kv_blocks.py).

Every expected value below is worked out by hand from the allocator's contract:
``ceil(tokens / block_size)`` blocks per request, block 0 never handed out, "cannot" is ``None``
and leaves the state untouched.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from accelgen.core.kv_blocks import KVBlockManager, KVUsage, blocks_for_tokens

pytestmark = pytest.mark.unit


# -- blocks_for_tokens -------------------------------------------------------------------------


@pytest.mark.unit
def test_paper_example_500_plus_300_tokens_need_7_blocks_of_128() -> None:
    # 800 tokens / 128 = 6.25 -> 7 blocks = 896 token slots (paper, mechanism 3).
    assert blocks_for_tokens(500 + 300, 128) == 7


@pytest.mark.unit
@pytest.mark.parametrize(
    ("tokens", "block_size", "blocks"),
    [(0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2), (32, 16, 2), (33, 16, 3), (896, 128, 7), (897, 128, 8)],
)
def test_blocks_for_tokens_is_ceiling(tokens: int, block_size: int, blocks: int) -> None:
    assert blocks_for_tokens(tokens, block_size) == blocks


@pytest.mark.unit
def test_blocks_for_negative_tokens_rejected() -> None:
    with pytest.raises(ValueError):
        blocks_for_tokens(-1, 16)


# -- construction ------------------------------------------------------------------------------


@pytest.mark.unit
def test_pool_excludes_null_block() -> None:
    kv = KVBlockManager(num_blocks=5, block_size=4)
    assert kv.total_usable_blocks == 4
    assert kv.num_free_blocks == 4
    assert kv.num_used_blocks == 0
    assert kv.usage() == KVUsage(total_blocks=4, used_blocks=0)
    assert kv.usage().free_blocks == 4
    assert kv.usage().utilisation == 0.0


@pytest.mark.unit
@pytest.mark.parametrize(("num_blocks", "block_size"), [(1, 16), (0, 16), (4, 0)])
def test_invalid_pool_rejected(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        KVBlockManager(num_blocks=num_blocks, block_size=block_size)


# -- allocate / grow / free --------------------------------------------------------------------


@pytest.mark.unit
def test_allocate_grow_free_return_values() -> None:
    kv = KVBlockManager(num_blocks=5, block_size=4)  # usable blocks 1..4
    # 5 tokens at 4 per block -> 2 blocks; the pool hands out the lowest ids first.
    assert kv.allocate("a", 5) == [1, 2]
    assert kv.block_table("a") == [1, 2]
    assert kv.num_blocks_of("a") == 2
    # 8 tokens still fit in 2 blocks: nothing new.
    assert kv.blocks_to_grow("a", 8) == 0
    assert kv.allocate("a", 8) == []
    assert kv.block_table("a") == [1, 2]
    # 9 tokens need a third block.
    assert kv.blocks_to_grow("a", 9) == 1
    assert kv.allocate("a", 9) == [3]
    assert kv.block_table("a") == [1, 2, 3]
    assert kv.num_used_blocks == 3 and kv.num_free_blocks == 1
    assert kv.usage().utilisation == pytest.approx(0.75)
    # Another request takes the last block.
    assert kv.allocate("b", 1) == [4]
    assert kv.num_free_blocks == 0
    # Free returns the whole table; freeing twice returns nothing.
    assert kv.free("a") == [1, 2, 3]
    assert kv.free("a") == []
    assert kv.free("never-seen") == []
    assert kv.num_free_blocks == 3
    assert kv.block_table("a") == []
    assert kv.num_blocks_of("a") == 0
    assert kv.owners() == {"b": [4]}
    kv.check_invariants()


@pytest.mark.unit
def test_block_table_is_a_copy() -> None:
    kv = KVBlockManager(num_blocks=5, block_size=4)
    kv.allocate("a", 4)
    table = kv.block_table("a")
    table.append(99)
    owners = kv.owners()
    owners["a"].append(98)
    assert kv.block_table("a") == [1]
    kv.check_invariants()


@pytest.mark.unit
def test_freed_blocks_are_reused() -> None:
    kv = KVBlockManager(num_blocks=4, block_size=4)  # usable 1..3
    assert kv.allocate("a", 12) == [1, 2, 3]
    assert kv.allocate("b", 1) is None
    kv.free("a")
    got = kv.allocate("b", 12)
    assert got is not None and sorted(got) == [1, 2, 3]
    kv.check_invariants()


@pytest.mark.unit
def test_allocate_that_does_not_fit_returns_none_and_changes_nothing() -> None:
    kv = KVBlockManager(num_blocks=5, block_size=4)  # 4 usable
    assert kv.allocate("a", 12) == [1, 2, 3]
    before = (kv.owners(), kv.num_free_blocks)
    # "b" needs 2 blocks, 1 is free.
    assert not kv.can_allocate("b", 8)
    assert kv.allocate("b", 8) is None
    # "a" growing to 5 blocks needs 2, 1 is free.
    assert kv.allocate("a", 20) is None
    assert (kv.owners(), kv.num_free_blocks) == before
    assert "b" not in kv.owners()
    kv.check_invariants()


@pytest.mark.unit
def test_reserve_blocks_must_stay_free() -> None:
    kv = KVBlockManager(num_blocks=5, block_size=4)  # 4 usable
    assert kv.allocate("a", 8) == [1, 2]  # 2 free left
    before = (kv.owners(), kv.num_free_blocks)
    # 1 block needed + 2 reserved = 3 > 2 free: refused, nothing changed.
    assert not kv.can_allocate("b", 4, reserve_blocks=2)
    assert kv.allocate("b", 4, reserve_blocks=2) is None
    assert (kv.owners(), kv.num_free_blocks) == before
    # 1 needed + 1 reserved = 2 <= 2: granted, and exactly one block is taken.
    assert kv.can_allocate("b", 4, reserve_blocks=1)
    assert kv.allocate("b", 4, reserve_blocks=1) == [3]
    assert kv.num_free_blocks == 1
    # A no-growth call with an impossible reserve is still refused.
    assert kv.allocate("b", 4, reserve_blocks=5) is None
    kv.check_invariants()


@pytest.mark.unit
def test_check_invariants_detects_corruption() -> None:
    kv = KVBlockManager(num_blocks=5, block_size=4)
    kv.allocate("a", 4)
    kv._tables["b"] = [1]  # the same block given to two owners  # noqa: SLF001
    with pytest.raises(AssertionError):
        kv.check_invariants()


# -- property test: random allocate / grow / free ------------------------------------------------


def _independent_check(kv: KVBlockManager, model: dict[str, int]) -> None:
    """Check the pool through its public views only, not through check_invariants()."""
    kv.check_invariants()
    owners = kv.owners()
    owned = [b for table in owners.values() for b in table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert 0 not in owned, "the null block was handed out"
    assert all(1 <= b < kv.num_blocks for b in owned)
    assert len(owned) == kv.num_used_blocks
    assert kv.num_free_blocks + kv.num_used_blocks == kv.total_usable_blocks == kv.num_blocks - 1
    free_ids = set(range(1, kv.num_blocks)) - set(owned)
    assert len(free_ids) == kv.num_free_blocks
    # The free pool itself: none both owned and free, nothing lost, no null block.
    free_pool = list(kv._free)  # noqa: SLF001
    assert set(free_pool) == free_ids and len(free_pool) == len(free_ids)
    # Each request holds exactly the number of blocks the model predicts.
    for rid, n in model.items():
        assert kv.num_blocks_of(rid) == n
    assert {rid for rid, t in owners.items() if t} == {rid for rid, n in model.items() if n}


class KVMachine(RuleBasedStateMachine):
    NUM_BLOCKS = 9
    BLOCK_SIZE = 4

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVBlockManager(self.NUM_BLOCKS, self.BLOCK_SIZE)
        self.model: dict[str, int] = {}  # request id -> blocks it must own

    @rule(
        rid=st.sampled_from(["a", "b", "c", "d"]),
        tokens=st.integers(min_value=0, max_value=40),
        reserve=st.integers(min_value=0, max_value=3),
    )
    def allocate(self, rid: str, tokens: int, reserve: int) -> None:
        have = self.model.get(rid, 0)
        want = -(-tokens // self.BLOCK_SIZE)
        need = max(0, want - have)
        free_before = self.kv.num_free_blocks
        table_before = self.kv.block_table(rid)
        got = self.kv.allocate(rid, tokens, reserve_blocks=reserve)
        if need + reserve > free_before:
            assert got is None
            assert self.kv.num_free_blocks == free_before
            assert self.kv.block_table(rid) == table_before
        else:
            assert got is not None and len(got) == need
            assert self.kv.block_table(rid) == table_before + got
            assert self.kv.num_free_blocks == free_before - need
            self.model[rid] = have + need

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.model)))
        table = self.kv.block_table(rid)
        free_before = self.kv.num_free_blocks
        assert self.kv.free(rid) == table
        assert self.kv.num_free_blocks == free_before + len(table)
        del self.model[rid]

    @invariant()
    def pool_is_consistent(self) -> None:
        _independent_check(self.kv, self.model)


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestKVMachine = pytest.mark.unit(TestKVMachine)


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(5))
def test_random_operations_keep_pool_consistent(seed: int) -> None:
    """A seeded random walk, longer than the stateful test's."""
    rng = random.Random(seed)
    kv = KVBlockManager(num_blocks=17, block_size=8)
    model: dict[str, int] = {}
    for _ in range(400):
        op = rng.random()
        rid = rng.choice("abcdef")
        if op < 0.6:
            tokens = rng.randint(0, 100)
            have = model.get(rid, 0)
            need = max(0, -(-tokens // 8) - have)
            reserve = rng.randint(0, 2)
            got = kv.allocate(rid, tokens, reserve_blocks=reserve)
            if got is not None:
                assert len(got) == need
                model[rid] = have + need
            else:
                assert need + reserve > kv.num_free_blocks
        else:
            kv.free(rid)
            model.pop(rid, None)
        _independent_check(kv, model)
