import pytest

from marserve.engine.block_manager import BlockManager


def run_prompt(bm, tokens):
    """Allocate a prompt and mark it all computed, as the engine does after its prefill."""
    alloc = bm.allocate(tokens)
    bm.mark_computed(alloc.block_table, tokens, len(tokens))
    return alloc


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    tables = [bm.allocate(list(range(s, s + n))).block_table for s, n in [(0, 5), (100, 4), (200, 9)]]
    assert [len(t) for t in tables] == [2, 1, 3]
    assert len({b for t in tables for b in t}) == 6 and bm.num_free_blocks == 2
    for t in tables:
        bm.free(t)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_shared_prefix_reuses_blocks_and_counts_hits():
    bm = BlockManager(num_blocks=16, block_size=4)
    prefix = list(range(12))  # three full blocks
    a = run_prompt(bm, prefix + [50, 51])
    b = bm.allocate(prefix + [60])
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert b.num_cached_tokens == 12
    assert bm.prefix_hits == 3
    # a shared block is freed only when its last user leaves
    bm.free(a.block_table)
    assert bm.num_free_blocks == 16 - 4  # b holds 3 shared + 1 own
    bm.free(b.block_table)
    assert bm.num_free_blocks == 16


def test_uncomputed_blocks_are_not_shared():
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(8))
    a = bm.allocate(tokens)  # not marked computed yet
    b = bm.allocate(tokens)
    assert b.num_cached_tokens == 0 and set(a.block_table).isdisjoint(b.block_table)


def test_whole_prompt_cached_still_recomputes_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(8))
    run_prompt(bm, tokens)
    again = bm.allocate(tokens)
    assert again.num_cached_tokens == 7


def test_freed_cached_blocks_survive_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = run_prompt(bm, [1, 2, 3, 4])  # blocks for (1,2), (3,4)
    first, second = a.block_table
    bm.free(a.block_table)  # freed last block first: (3,4) is least recently freed
    hit = bm.allocate([1, 2, 3, 4, 9])
    assert hit.block_table[:2] == [first, second] and hit.num_cached_tokens == 4
    bm.free(hit.block_table)
    # fill the pool with new content: eviction takes never-used blocks first, then LRU cached ones
    c = bm.allocate([7, 7, 8, 8, 6, 6, 5, 5])
    assert len(c.block_table) == 4 and bm.num_free_blocks == 0
    bm.free(c.block_table)
    assert bm.allocate([1, 2, 3]).num_cached_tokens == 0  # (1,2) was evicted


def test_capacity_checks_and_growth():
    bm = BlockManager(num_blocks=3, block_size=4)
    assert not bm.can_allocate(list(range(13)))
    with pytest.raises(MemoryError):
        bm.allocate(list(range(13)))
    alloc = bm.allocate(list(range(4)))
    bm.ensure_capacity(alloc.block_table, 5)
    assert len(alloc.block_table) == 2
    assert bm.can_append(alloc.block_table, 12) and not bm.can_append(alloc.block_table, 13)
    with pytest.raises(MemoryError):
        bm.ensure_capacity(alloc.block_table, 13)


def test_decode_growth_registers_full_blocks_for_later_requests():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = [1, 2, 3]
    a = run_prompt(bm, tokens)
    for t in [4, 5, 6, 7, 8]:  # decode: grow, then mark what is computed
        tokens.append(t)
        bm.ensure_capacity(a.block_table, len(tokens))
        bm.mark_computed(a.block_table, tokens, len(tokens))
    b = bm.allocate([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]


def test_double_free_is_an_error():
    bm = BlockManager(num_blocks=2, block_size=2)
    table = bm.allocate([1, 2]).block_table
    copy = list(table)
    bm.free(table)
    with pytest.raises(RuntimeError):
        bm.free(copy)


def test_prefix_caching_off_shares_nothing():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = run_prompt(bm, [1, 2, 3, 4])
    b = bm.allocate([1, 2, 3, 4])
    assert b.num_cached_tokens == 0 and set(a.block_table).isdisjoint(b.block_table)
