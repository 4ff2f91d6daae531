"""Block manager and scheduler on tiny configs: exact block ids, chunking, preemption."""
from shardline.scheduler.block_manager import BlockManager
from shardline.scheduler.request import Sequence, SeqStatus
from shardline.scheduler.scheduler import Scheduler
from shardline.protocol.plan import SampledToken


def seq(i, n_prompt, max_tokens=8, eos=()):
    return Sequence(seq_id=i, prompt_token_ids=list(range(100 * i, 100 * i + n_prompt)),
                    max_tokens=max_tokens, eos_token_ids=frozenset(eos))


def run_step(s: Scheduler, token=7):
    batch = s.schedule()
    toks = [SampledToken(q.seq_id, token) for q, st in batch.items if st.sample]
    return batch, s.postprocess(batch, toks)


def grow(bm: BlockManager, q: Sequence, n: int):
    """allocate as the scheduler does: the new ids go to the end of q's table."""
    new = bm.allocate(q, n)
    if new is not None:
        q.block_table.extend(new)
    return new


def test_block_manager_allocates_lowest_ids_and_frees():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(1, 6), seq(2, 4)
    assert grow(bm, a, 6) == [0, 1]
    assert grow(bm, b, 4) == [2]
    a.num_computed_tokens = 6
    assert grow(bm, a, 2) == []             # 8 tokens still fit in 2 blocks
    a.num_computed_tokens = 8
    assert grow(bm, a, 1) == [3]
    assert a.block_table == [0, 1, 3] and bm.num_free_blocks == 4
    bm.free(a)
    assert bm.num_free_blocks == 7
    assert bm.allocate(seq(3, 40), 40) is None   # needs 10 blocks: says no, changes nothing
    assert bm.num_free_blocks == 7


def test_prefill_then_decode_plans():
    s = Scheduler(BlockManager(16, 4), max_num_batched_tokens=64)
    a = seq(1, 5, max_tokens=3)
    s.add(a)
    batch, events = run_step(s, token=9)
    (q, step), = batch.items
    assert step.admit and step.token_ids == list(range(100, 105)) and step.start_pos == 0
    assert step.new_block_ids == [0, 1] and step.sample and step.num_generated == 0
    assert a.output_token_ids == [9] and a.num_computed_tokens == 5
    batch, _ = run_step(s, token=10)
    (_, step), = batch.items
    assert not step.admit and step.token_ids == [9] and step.start_pos == 5
    assert step.new_block_ids == [] and step.num_generated == 1
    batch, events = run_step(s, token=11)
    assert events[-1].finish_reason == "length" and a.is_finished
    assert s.blocks.num_free_blocks == 16
    batch = s.schedule()                     # the worker is told to forget seq 1
    assert batch.items == [] and batch.free_seq_ids == [1]
    assert s.schedule() is None


def test_chunked_prefill_under_token_budget_and_decodes_first():
    s = Scheduler(BlockManager(32, 4), max_num_batched_tokens=8)
    a, b = seq(1, 3), seq(2, 20)
    s.add(a)
    run_step(s)                              # a prefilled, now decoding
    s.add(b)
    batch, _ = run_step(s)
    assert [(q.seq_id, len(st.token_ids), st.sample) for q, st in batch.items] == [(1, 1, True), (2, 7, False)]
    batch, _ = run_step(s)
    assert [(q.seq_id, st.start_pos, len(st.token_ids)) for q, st in batch.items] == [(1, 4, 1), (2, 7, 7)]
    batch, _ = run_step(s)
    (qa, sa), (qb, sb) = batch.items
    assert (sb.start_pos, len(sb.token_ids), sb.sample) == (14, 6, True)
    assert b.output_token_ids == [7]


def test_eos_stops_and_abort_frees():
    s = Scheduler(BlockManager(8, 4))
    a, b = seq(1, 4, eos=[5]), seq(2, 4)
    s.add(a), s.add(b)
    batch, events = run_step(s, token=5)
    assert a.finish_reason == "stop" and not b.is_finished
    s.abort(b)
    assert b.finish_reason == "abort" and s.blocks.num_free_blocks == 8
    assert sorted(s.schedule().free_seq_ids) == [1, 2]


def test_preemption_by_recompute_when_blocks_run_out():
    s = Scheduler(BlockManager(4, 4), max_num_batched_tokens=64)
    a, b = seq(1, 8, max_tokens=20), seq(2, 7, max_tokens=20)
    s.add(a), s.add(b)
    batch, _ = run_step(s)                   # a: blocks 0,1; b: blocks 2,3 -> pool empty
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    batch, _ = run_step(s)                   # a needs a 3rd block: newest (b) is preempted
    assert [q.seq_id for q, _ in batch.items] == [1]
    assert b.status is SeqStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    # b's full first block stays cached; the unhashed tail block is reused first.
    assert batch.free_seq_ids == [2] and a.block_table == [0, 1, 3]
    assert s.num_preemptions == 1
    # b keeps its generated token and is recomputed from prompt + output when room returns,
    # starting after its cached first block.
    assert b.output_token_ids == [7]
    s.abort(a)
    batch = s.schedule()
    (q, st), = batch.items
    assert q is b and st.admit and st.start_pos == 4 and st.token_ids == [204, 205, 206, 7]
    assert st.new_block_ids == b.block_table and b.block_table[0] == 2
    assert b.num_cached_tokens == 0                    # usage counts the first admission only


def test_in_flight_sequences_are_not_rescheduled():
    s = Scheduler(BlockManager(8, 4))
    a = seq(1, 4)
    s.add(a)
    first = s.schedule()
    assert s.schedule() is None              # a is in flight: the second micro-batch is empty
    s.postprocess(first, [SampledToken(1, 3)])
    assert [q.seq_id for q, _ in s.schedule().items] == [1]


def test_lookahead_plans_the_next_decode_while_one_is_in_flight():
    s = Scheduler(BlockManager(8, 4), max_num_batched_tokens=64, lookahead=True)
    a = seq(1, 3, max_tokens=4, eos=(99,))
    s.add(a)
    prefill = s.schedule()
    (_, st), = prefill.items
    assert st.admit and st.sample and st.new_block_ids == [0]
    ahead = s.schedule()                     # planned before the prefill's token is known
    (_, la), = ahead.items
    assert la.last_sampled and la.token_ids == [] and la.num_tokens == 1 and la.sample
    assert la.start_pos == 3 and la.new_block_ids == [] and la.num_generated == 1
    assert s.schedule() is None              # two steps of a in flight: nothing more
    s.postprocess(prefill, [SampledToken(1, 5)])
    assert a.output_token_ids == [5] and a.num_computed_tokens == 3
    third = s.schedule()                     # a's position 4 needs a second block
    (_, st3), = third.items
    assert st3.last_sampled and st3.start_pos == 4 and st3.new_block_ids == [1]
    assert st3.num_generated == 2
    s.postprocess(ahead, [SampledToken(1, 6)])
    assert a.output_token_ids == [5, 6] and a.num_computed_tokens == 4
    # the next token (the 3rd of 4) would be followed by the last one: planned as well; after
    # it, a's 4th token ends it by length, so nothing is planned past it
    fourth = s.schedule()
    (_, st4), = fourth.items
    assert st4.start_pos == 5 and st4.num_generated == 3
    s.postprocess(third, [SampledToken(1, 99)])        # EOS: a ends with a step in flight
    assert a.is_finished and a.finish_reason == "stop" and s.blocks.num_free_blocks == 8
    events = s.postprocess(fourth, [SampledToken(1, 7)])
    assert events == [] and a.output_token_ids == [5, 6, 99] and a.in_flight == 0
    assert s.schedule().free_seq_ids == [1]


def test_lookahead_waits_for_a_prompt_chunk_and_at_the_length_limit():
    s = Scheduler(BlockManager(16, 4), max_num_batched_tokens=4, lookahead=True)
    a = seq(1, 6, max_tokens=1)
    s.add(a)
    first = s.schedule()                     # 4 of 6 prompt tokens: no token sampled yet
    assert s.schedule() is None
    s.postprocess(first, [])
    last_chunk = s.schedule()
    (_, st), = last_chunk.items
    assert st.token_ids == [104, 105] and st.sample
    assert s.schedule() is None              # its token is the only one (max_tokens=1)
    s.postprocess(last_chunk, [SampledToken(1, 3)])
    assert a.is_finished and a.finish_reason == "length"


def test_prefix_cache_hits_exact_blocks_and_lru_eviction():
    bm = BlockManager(6, 4)
    s = Scheduler(bm, max_num_batched_tokens=64)
    shared = list(range(500, 508))                      # two full blocks
    a = Sequence(1, shared + [1, 2, 3], max_tokens=1)
    s.add(a)
    run_step(s)                                          # a finishes after one token
    assert a.is_finished and a.finish_reason == "length"
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2
    b = Sequence(2, shared + [9, 9], max_tokens=1)
    s.add(b)
    batch = s.schedule()
    (_, st), = batch.items
    assert st.start_pos == 8 and st.token_ids == [9, 9] and b.num_cached_tokens == 8
    assert st.new_block_ids[:2] == [0, 1]                # a's first two blocks, shared
    # Another tenant never hits.
    c = Sequence(3, shared + [9, 9], max_tokens=1, cache_salt="tenant-x")
    s.add(c)
    batch2 = s.schedule()
    (_, st2), = batch2.items
    assert st2.start_pos == 0 and c.num_cached_tokens == 0 and 0 not in st2.new_block_ids
    # Whole-prompt hits still compute the last token.
    d = Sequence(4, shared, max_tokens=1)
    assert bm.match_prefix(d) == ([0], 4)


def test_eviction_order_is_least_recently_freed_first():
    events = []
    bm = BlockManager(4, 2, listener=lambda ev, items: events.append((ev, items)))
    x = Sequence(1, [1, 2, 3, 4], max_tokens=1)
    grow(bm, x, 4)
    x.num_computed_tokens = 4
    assert bm.commit_full_blocks(x) == 2
    h0, h1 = x.full_block_hash(0, 2), x.full_block_hash(1, 2)
    assert events == [("stored", [(h0, 0), (h1, 1)])]
    bm.free(x)                                           # tail block 1 first in eviction order
    y = Sequence(2, [7, 7, 7, 7, 7, 7], max_tokens=1)
    assert bm.allocate(y, 6) == [2, 3, 1]                # unhashed first, then LRU cached
    assert events[-1] == ("evicted", [(h1, 1)])
    assert bm.num_cached_blocks == 1
    assert bm.match_prefix(Sequence(3, [1, 2, 3, 4, 5], 1)) == ([0], 2)
