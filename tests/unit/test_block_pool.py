"""BlockPool and the BlockManager above it: exact block ids, eviction order, stored / evicted
events, restore, and a prefix lookup that writes nothing."""
import dataclasses

from shardline.scheduler.block_manager import BlockManager
from shardline.scheduler.block_pool import ROOT_HASH, BlockPool, block_hash
from shardline.scheduler.request import Sequence
from shardline.scheduler.scheduler import Scheduler
from shardline.protocol.plan import SampledToken


class Events(list):
    def __call__(self, event, items):
        self.append((event, list(items)))


def pool_state(pool: BlockPool):
    return ([dataclasses.astuple(b) for b in pool.blocks], pool.free_queue(),
            pool.num_cached_blocks)


# -- the pool ---------------------------------------------------------------------------------
def test_pool_allocates_from_the_front_and_says_no_without_changing_anything():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.free_queue() == [3]
    before = pool_state(pool)
    assert pool.allocate(2) is None
    assert pool_state(pool) == before
    assert pool.allocate(0) == []


def test_pool_free_puts_empty_blocks_first_and_cached_blocks_last():
    events = Events()
    pool = BlockPool(6, listener=events)
    assert pool.allocate(4) == [0, 1, 2, 3]
    pool.cache([(0, "h0", (1,)), (1, "h1", (2,))])
    assert events == [("stored", [("h0", 0), ("h1", 1)])]
    pool.free([3, 2, 1, 0])                 # tail first, as the manager frees a sequence
    # empty 2 and 3 go to the front (the last freed first), cached 1 then 0 to the back
    assert pool.free_queue() == [2, 3, 4, 5, 1, 0]
    assert pool.num_free_blocks == 6 and pool.num_cached_blocks == 2
    assert pool.allocate(5) == [2, 3, 4, 5, 1]
    assert events[-1] == ("evicted", [("h1", 1)])
    assert pool.lookup("h1", (2,)) is None and pool.lookup("h0", (1,)) == 0


def test_pool_evictions_of_one_allocation_are_one_event_in_lru_order():
    events = Events()
    pool = BlockPool(3, listener=events)
    pool.allocate(3)
    pool.cache([(0, "a", (0,)), (1, "b", (1,)), (2, "c", (2,))])
    pool.free([1])
    pool.free([0])
    pool.free([2])
    assert pool.free_queue() == [1, 0, 2]    # least recently freed first
    assert pool.allocate(2) == [1, 0]
    assert events[-1] == ("evicted", [("b", 1), ("a", 0)])
    assert pool.num_cached_blocks == 1


def test_pool_touch_takes_cached_blocks_out_of_the_free_queue_and_shares_them():
    pool = BlockPool(3)
    pool.allocate(1)
    pool.cache([(0, "h", (5,))])
    pool.free([0])
    assert pool.num_free_among([0, 1]) == 2
    pool.touch([0])
    pool.touch([0])
    assert pool.blocks[0].ref_count == 2 and pool.free_queue() == [1, 2]
    assert pool.allocate(2) == [1, 2]        # a held cached block is never evicted
    pool.free([0])
    assert pool.free_queue() == []
    pool.free([0])
    assert pool.free_queue() == [0] and pool.lookup("h", (5,)) == 0


def test_pool_checks_tokens_on_a_hash_hit_and_keeps_the_first_of_two_copies():
    events = Events()
    pool = BlockPool(2, listener=events)
    pool.allocate(2)
    pool.cache([(0, "h", (1, 2))])
    pool.cache([(1, "h", (1, 2))])           # the same content computed twice: keep block 0
    assert events == [("stored", [("h", 0)])]
    assert pool.lookup("h", (1, 2)) == 0
    assert pool.lookup("h", (9, 9)) is None  # a colliding hash with other tokens is a miss
    assert pool.blocks[1].hash is None


def test_pool_restore_takes_free_empty_blocks_and_learns_tokens_on_commit():
    events = Events()
    pool = BlockPool(4, listener=events)
    pool.allocate(1)                         # block 0 is held: not restorable
    n = pool.restore([("a", 0), ("b", 2), ("c", 9), ("b", 3), ("d", 3)])
    assert n == 2 and events == []           # b -> 2 (the second b is a duplicate), d -> 3
    assert pool.free_queue() == [1, 2, 3]    # restored blocks are the most recently freed
    assert pool.lookup("b", (7, 7)) == 2     # tokens unknown: the hash vouches
    pool.touch([2])
    pool.cache([(2, "b", (7, 7))])           # a sequence that took it commits it
    assert events == [] and pool.lookup("b", (8, 8)) is None


def test_block_hash_chains_parent_and_salt():
    h = block_hash(ROOT_HASH, [1, 2], "")
    assert h == block_hash(ROOT_HASH, [1, 2], "")
    assert h != block_hash(ROOT_HASH, [1, 2], "tenant-x")
    assert block_hash(h, [3, 4], "") != block_hash(ROOT_HASH, [3, 4], "")


# -- the manager -------------------------------------------------------------------------------
def finished_prefix(bm: BlockManager, tokens: list[int]) -> Sequence:
    """Run one sequence over tokens through a scheduler to its end, leaving its blocks cached."""
    s = Scheduler(bm, max_num_batched_tokens=256)
    q = Sequence(99, list(tokens), max_tokens=1)
    s.add(q)
    batch = s.schedule()
    s.postprocess(batch, [SampledToken(99, 0)])
    assert q.is_finished
    return q


def manager_state(bm: BlockManager, *seqs: Sequence):
    seq_fields = [(q.num_computed_tokens, list(q.block_table), q.num_cached_tokens,
                   q.num_committed_blocks, q.status, q.admitted) for q in seqs]
    return pool_state(bm.pool), bm.hits, bm.queries, seq_fields


def test_match_prefix_writes_nothing():
    bm = BlockManager(8, 4)
    shared = list(range(500, 512))                       # three full blocks
    finished_prefix(bm, shared + [1])
    bm.restore([("restored", 7)])
    q = Sequence(1, shared[:8] + [3, 3], max_tokens=4)
    before = manager_state(bm, q)
    for _ in range(3):
        assert bm.match_prefix(q) == ([0, 1], 8)
    assert manager_state(bm, q) == before
    # a whole-prompt hit still leaves the last token to compute
    assert bm.match_prefix(Sequence(2, shared, max_tokens=1)) == ([0, 1], 8)
    assert manager_state(bm, q) == before


def test_allocate_with_prefix_takes_the_hit_and_counts_it():
    bm = BlockManager(6, 4)
    shared = list(range(500, 508))
    finished_prefix(bm, shared + [1])                    # blocks 0, 1 cached; 2 empty
    assert bm.pool.free_queue() == [2, 3, 4, 5, 1, 0]
    assert (bm.hits, bm.queries) == (0, 9)
    q = Sequence(1, shared + [9] * 6, max_tokens=4)      # 14 tokens
    prefix, cached = bm.match_prefix(q)
    assert (prefix, cached) == ([0, 1], 8)
    new = bm.allocate(q, 6, prefix=prefix)               # tokens 8..13: two more blocks
    assert new == [2, 3]
    assert (bm.hits, bm.queries) == (0 + 8, 9 + 14)
    assert q.block_table == [] and q.num_computed_tokens == 0   # the caller sets them
    assert bm.num_free_blocks == 2 and bm.pool.free_queue() == [4, 5]


def test_allocate_counts_free_cached_prefix_blocks_against_the_room():
    bm = BlockManager(3, 4)
    shared = list(range(500, 508))
    finished_prefix(bm, shared + [1])                    # 0, 1 cached and free; 2 empty
    q = Sequence(1, shared + [9] * 8, max_tokens=1)      # needs 2 new blocks + the hit
    prefix, _ = bm.match_prefix(q)
    before = manager_state(bm, q)
    assert bm.allocate(q, 8, prefix=prefix) is None      # 3 free, but 2 of them are the hit
    assert manager_state(bm, q) == before
    assert bm.allocate(q, 4, prefix=prefix) == [2]


def test_commit_full_blocks_returns_the_committed_count_and_stores_once():
    events = Events()
    bm = BlockManager(4, 2, listener=events)
    q = Sequence(1, [1, 2, 3, 4, 5], max_tokens=4)
    q.block_table = bm.allocate(q, 5)
    assert q.block_table == [0, 1, 2]
    q.num_computed_tokens = 3
    assert bm.commit_full_blocks(q) == 1
    q.num_committed_blocks = 1
    q.num_computed_tokens = 5
    assert bm.commit_full_blocks(q) == 2                 # block 2 holds one token: not full
    assert events == [("stored", [(q.full_block_hash(0, 2), 0)]),
                      ("stored", [(q.full_block_hash(1, 2), 1)])]
    q.num_committed_blocks = 2
    assert bm.commit_full_blocks(q) == 2 and len(events) == 2


def test_prefix_caching_off_matches_and_commits_nothing():
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    q = Sequence(1, [1, 2, 3, 4, 5], max_tokens=1)
    q.block_table = bm.allocate(q, 5, prefix=[])
    q.num_computed_tokens = 5
    assert bm.commit_full_blocks(q) == 0 and bm.num_cached_blocks == 0
    assert bm.match_prefix(q) == ([], 0)


def test_block_hashes_follow_the_block_size_of_the_replica():
    q = Sequence(1, list(range(8)), max_tokens=1)
    h4 = q.full_block_hash(0, 4)
    h2 = q.full_block_hash(0, 2)                         # moved to a replica with blocks of 2
    assert h2 == block_hash(ROOT_HASH, [0, 1], "") and h4 == block_hash(ROOT_HASH, [0, 1, 2, 3], "")
    assert q.full_block_hash(0, 4) == h4
