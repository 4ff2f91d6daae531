"""Sliding-window models: the block manager releases the blocks every layer's window has left
behind while a sequence runs (exact ids), prefix hits claim only blocks still cached, and
preemption, lookahead and the end of a sequence never free a block twice. A simulated worker
checks every position a step reads still holds that sequence's K/V."""
import asyncio
import random

import pytest

from shardline.protocol.plan import SampledToken
from shardline.scheduler.block_manager import PLACEHOLDER_BLOCK, UNBOUNDED, BlockManager
from shardline.scheduler.engine import PipelineEngine
from shardline.scheduler.pipeline import PipelineClient
from shardline.scheduler.request import Sequence, SeqStatus
from shardline.scheduler.scheduler import Scheduler
from shardline.v1 import worker_pb2
from tests.unit.fake_pipeline import STEP_TIMEOUT_S, FakePipeline, token_for


def run_step(s: Scheduler, token=7):
    batch = s.schedule()
    s.postprocess(batch, [SampledToken(q.seq_id, token) for q, st in batch.items if st.sample])
    return batch


def held(bm: BlockManager) -> list[int]:
    return sorted(b.block_id for b in bm.pool.blocks if b.ref_count)


def test_num_outside_window_and_capacity():
    bm = BlockManager(4, 4, window=8)
    # block i (positions 4i .. 4i+3) is out of every window once 4i + 3 <= p - 8
    assert [bm.num_outside_window(p) for p in (0, 7, 10, 11, 14, 15, 19)] == [0, 0, 0, 1, 1, 2, 3]
    assert BlockManager(4, 4).num_outside_window(1000) == 0
    # one step of 4 tokens needs at most ceil((8 + 4 + 2) / 4) = 4 blocks: any length fits
    assert bm.seq_capacity_tokens(4) == UNBOUNDED
    assert bm.seq_capacity_tokens(8) == 16           # a chunk of 8 may need 5: the pool's 16
    assert BlockManager(4, 4).seq_capacity_tokens(4) == 16


def test_the_pipeline_window_is_the_stages_largest_or_none():
    pipe = PipelineClient("0", [])
    for windows, want in [((512, 256), 512), ((512, 0), 0), ((4096,), 4096), ((), 0)]:
        pipe.infos = [worker_pb2.StageInfo(attention_window=w) for w in windows]
        assert pipe.attention_window == want
    pipe.infos = [worker_pb2.StageInfo(attention_window=512), worker_pb2.StageInfo()]
    assert pipe.attention_window == 0                # a worker from before the field: no release


def test_the_engine_runs_a_sequence_longer_than_its_pool():
    async def body():
        fake = FakePipeline(num_blocks=6, block_size=4, attention_window=8)
        engine = PipelineEngine(fake, max_num_seqs=4, max_num_batched_tokens=4,
                                step_timeout_s=STEP_TIMEOUT_S)
        assert engine.blocks.window == 8 and engine.capacity_tokens == UNBOUNDED
        engine.start()
        a = Sequence(1, list(range(10, 30)), max_tokens=30)      # 50 tokens, 13 blocks
        q = asyncio.Queue()
        engine.add(a, q)
        events = [await asyncio.wait_for(q.get(), STEP_TIMEOUT_S) for _ in range(30)]
        assert [e.token.token_id for e in events] == [token_for(1, i) for i in range(30)]
        assert events[-1].finish_reason == "length" and engine.scheduler.num_preemptions == 0
        assert fake.computed(1) == a.prompt_token_ids + a.output_token_ids[:-1]
        assert engine.blocks.num_free_blocks == 6
        await engine.stop()
    asyncio.run(body())
    without = PipelineEngine(FakePipeline(num_blocks=6, block_size=4), max_num_seqs=4,
                             max_num_batched_tokens=4, step_timeout_s=STEP_TIMEOUT_S)
    assert without.capacity_tokens == 24


def test_decode_releases_each_block_once_the_window_has_passed_it():
    """A 20-token sequence (5 blocks) in a pool of 4, window 8: it holds at most 3 after a step."""
    bm = BlockManager(4, 4, window=8)
    s = Scheduler(bm, max_num_batched_tokens=64)
    a = Sequence(1, list(range(100, 106)), max_tokens=14)
    s.add(a)
    trace = []
    for _ in range(14):
        batch = run_step(s)
        (_, st), = batch.items
        trace.append((st.start_pos, st.new_block_ids, a.num_released_blocks, held(bm)))
    assert trace == [
        (0, [0, 1], 0, [0, 1]),          # prompt 0..5
        (6, [], 0, [0, 1]),
        (7, [], 0, [0, 1]),
        (8, [2], 0, [0, 1, 2]),
        (9, [], 0, [0, 1, 2]),
        (10, [], 1, [1, 2]),             # next position 11: block 0 (0..3) is out
        (11, [], 1, [1, 2]),
        (12, [3], 1, [1, 2, 3]),
        (13, [], 1, [1, 2, 3]),
        (14, [], 2, [2, 3]),             # next 15: block 1 (4..7) is out
        (15, [], 2, [2, 3]),
        (16, [0], 2, [0, 2, 3]),         # block 0 reused (its cached content evicted)
        (17, [], 2, [0, 2, 3]),
        (18, [], 0, []),                 # the 14th token: finished, everything free
    ]
    assert a.finish_reason == "length" and s.num_preemptions == 0
    # the placeholder at index 0 and the reused block 4 share id 0; the end freed the latter once
    assert bm.num_free_blocks == 4 and all(b.ref_count == 0 for b in bm.pool.blocks)
    assert bm.pool.free_queue() == [0, 1, 2, 3]     # 0 unhashed first, then LRU cached 1, 2, 3
    assert bm.num_cached_blocks == 3


def test_without_a_window_the_same_sequence_preempts_itself():
    s = Scheduler(BlockManager(4, 4), max_num_batched_tokens=64)
    a = Sequence(1, list(range(100, 106)), max_tokens=14)
    s.add(a)
    for _ in range(11):                  # positions 0..15: blocks 0..3
        run_step(s)
    batch = s.schedule()                 # position 16 needs a 5th block: none, nothing to preempt
    assert batch.items == [] and a.status is SeqStatus.WAITING and s.num_preemptions == 1


def test_chunked_prefill_releases_as_the_chunks_advance():
    """A chunk of n tokens from s needs positions s - 7 onward: 3 blocks held, never 6."""
    bm = BlockManager(6, 4, window=8)
    s = Scheduler(bm, max_num_batched_tokens=4)
    a = Sequence(1, list(range(100, 124)), max_tokens=2)
    s.add(a)
    trace = []
    while not a.is_finished:
        batch = run_step(s)
        (_, st), = batch.items
        trace.append((st.start_pos, len(st.token_ids), st.new_block_ids, held(bm),
                      bm.pool.free_queue()))
    assert trace == [
        (0, 4, [0], [0], [1, 2, 3, 4, 5]),
        (4, 4, [1], [0, 1], [2, 3, 4, 5]),
        (8, 4, [2], [1, 2], [3, 4, 5, 0]),           # next 12: block 0 out, cached at the back
        (12, 4, [3], [2, 3], [4, 5, 0, 1]),
        (16, 4, [4], [3, 4], [5, 0, 1, 2]),
        (20, 4, [5], [4, 5], [0, 1, 2, 3]),          # samples the first token
        (24, 1, [0], [], [0, 1, 2, 3, 5, 4]),        # evicts 0's content; the 2nd token ends a
    ]
    assert a.block_table == [] and a.num_released_blocks == 0


def test_prefix_hit_claims_only_the_cached_blocks_inside_the_window():
    bm = BlockManager(8, 4, window=8)
    s = Scheduler(bm, max_num_batched_tokens=64)
    prompt = list(range(500, 520))                   # 5 full blocks
    a = Sequence(1, prompt, max_tokens=1)
    s.add(a)
    run_step(s)                                      # computes 0..19, releases 0..2, then ends
    assert a.is_finished and bm.num_cached_blocks == 5
    assert bm.pool.free_queue() == [5, 6, 7, 0, 1, 2, 4, 3]
    # evict block 3 (a's positions 12..15), keep 0, 1, 2 and 4: a window from 16 needs block 3
    assert bm.allocate(Sequence(2, [1] * 12, 1), 12) == [5, 6, 7]
    bm.pool.touch([0, 1, 2, 4])
    assert bm.pool.allocate(1) == [3]
    bm.pool.free([0, 1, 2, 4])
    b = Sequence(3, prompt + [9, 9, 9], max_tokens=1)
    # k = 5 blocks (start 20) needs 3 and 4; k = 4 needs 2 and 3; k = 3 (start 12) needs 1, 2
    assert bm.match_prefix(b) == ([PLACEHOLDER_BLOCK, 1, 2], 12)   # position 12 reads 5..11


def test_prefix_hit_past_evicted_blocks_and_its_placeholders():
    bm = BlockManager(8, 4, window=8)
    s = Scheduler(bm, max_num_batched_tokens=64)
    prompt = list(range(500, 520))
    a = Sequence(1, prompt, max_tokens=1)
    s.add(a)
    run_step(s)
    assert bm.allocate(Sequence(2, [1] * 16, 1), 16) == [5, 6, 7, 0]   # evicts a's block 0
    b = Sequence(3, prompt + [9, 9, 9], max_tokens=1)
    assert bm.match_prefix(b) == ([PLACEHOLDER_BLOCK] * 3 + [3, 4], 20)
    s.add(b)
    batch = s.schedule()
    (_, st), = batch.items
    # blocks 1 and 2 are cached too but outside the window: left free, not claimed
    assert st.admit and st.start_pos == 20 and st.token_ids == [9, 9, 9]
    assert st.new_block_ids == [0, 0, 0, 3, 4, 1] and b.num_released_blocks == 3
    assert b.num_cached_tokens == 20 and (bm.hits, bm.queries) == (20, 20 + 23)
    # 5, 6, 7, 0: the allocation above; 3, 4: the hit; 1: b's new block (its content evicted)
    assert held(bm) == [0, 1, 3, 4, 5, 6, 7] and bm.pool.blocks[2].ref_count == 0
    s.postprocess(batch, [SampledToken(3, 7)])       # next 23: index 3 (block 3) is out too
    assert b.is_finished and held(bm) == [0, 5, 6, 7]
    assert all(b.ref_count <= 1 for b in bm.pool.blocks)


def test_a_released_block_taken_by_a_prefix_hit_is_not_freed_again():
    bm = BlockManager(8, 4, window=8)
    s = Scheduler(bm, max_num_batched_tokens=64)
    prompt = list(range(500, 516))
    a = Sequence(1, prompt, max_tokens=2)
    s.add(a)
    run_step(s)                                      # next 16: a releases blocks 0 and 1
    assert a.block_table == [0, 1, 2, 3] and a.num_released_blocks == 2
    assert bm.pool.free_queue() == [4, 5, 6, 7, 0, 1]
    b = Sequence(2, prompt[:8] + [9, 9], max_tokens=3)
    s.add(b)
    batch = run_step(s)                              # a decodes (block 4) and ends; b hits 0, 1
    assert [(q.seq_id, st.new_block_ids) for q, st in batch.items] == [(1, [4]), (2, [0, 1, 5])]
    assert a.is_finished and held(bm) == [0, 1, 5]
    assert [bm.pool.blocks[i].ref_count for i in (0, 1, 5)] == [1, 1, 1]
    assert bm.pool.free_queue() == [4, 6, 7, 3, 2]   # a's end: unhashed 4 first, 3 and 2 cached
    run_step(s)                                      # b's next 11: its block 0 is out
    assert b.num_released_blocks == 1 and held(bm) == [1, 5]
    run_step(s)
    assert b.is_finished and held(bm) == [] and bm.num_free_blocks == 8
    assert bm.pool.free_queue() == [4, 6, 7, 3, 2, 0, 5, 1]


def test_preemption_and_recompute_with_released_blocks():
    bm = BlockManager(5, 4, window=8)
    s = Scheduler(bm, max_num_batched_tokens=64)
    a = Sequence(1, list(range(100, 108)), max_tokens=12)
    b = Sequence(2, list(range(200, 208)), max_tokens=12)
    s.add(a), s.add(b)
    run_step(s)
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    batch = run_step(s)                  # position 8: a gets 4, b (nothing else to preempt) waits
    assert [q.seq_id for q, _ in batch.items] == [1] and batch.free_seq_ids == [2]
    assert b.status is SeqStatus.WAITING and s.num_preemptions == 1
    assert bm.pool.free_queue() == [3, 2]            # b's cached blocks
    run_step(s)
    batch = run_step(s)                  # a's next 11: releases block 0; b still does not fit
    assert [q.seq_id for q, _ in batch.items] == [1] and a.num_released_blocks == 1
    batch = run_step(s)                  # b re-admitted on its cached blocks 2, 3 plus 0
    (_, sa), (qb, sb) = batch.items
    assert qb is b and sb.admit and sb.start_pos == 8 and sb.new_block_ids == [2, 3, 0]
    batch = run_step(s)                  # a's position 12 needs a block: b is preempted again
    assert [q.seq_id for q, _ in batch.items] == [1] and batch.free_seq_ids == [2]
    assert a.block_table == [0, 1, 4, 0] and a.num_released_blocks == 1
    assert held(bm) == [0, 1, 4]                     # a's placeholder 0 is its new block 0
    steps = 0
    while not (a.is_finished and b.is_finished):
        run_step(s)
        steps += 1
        assert steps < 100
        live = [q for q in (a, b) if q.status is SeqStatus.RUNNING]
        want = sorted(i for q in live for i in q.block_table[q.num_released_blocks:])
        assert sorted(i for i, blk in enumerate(bm.pool.blocks)
                      for _ in range(blk.ref_count)) == want
    assert len(a.output_token_ids) == len(b.output_token_ids) == 12
    assert bm.num_free_blocks == 5 and all(blk.ref_count == 0 for blk in bm.pool.blocks)


# -- a simulated worker: every position read must hold its sequence's K/V ------------------------
class CheckedWorker:
    """Runs plans as a stage does (block tables from the plans, K/V written at the positions
    computed), but stores in each slot what that K/V stands for, (salt, tokens up to and
    including the position), and checks each position a step reads: its window, or every
    earlier position without one."""

    def __init__(self, block_size: int, window: int):
        self.bs, self.window = block_size, window
        self.slots: dict[tuple[int, int], tuple] = {}
        self.tables: dict[int, list[int]] = {}
        self.last: dict[int, int] = {}

    def run(self, batch, token_of):
        for sid in batch.free_seq_ids:
            self.tables.pop(sid, None)
        sampled = []
        for seq, st in batch.items:
            table = self.tables.setdefault(st.seq_id, [])
            if st.admit:
                table[:] = st.new_block_ids
            else:
                table.extend(st.new_block_ids)
            tokens = seq.token_ids(0, st.start_pos) + (
                [self.last[st.seq_id]] if st.last_sampled else list(st.token_ids))
            for p in range(st.start_pos, st.start_pos + st.num_tokens):
                kv = (seq.cache_salt, tuple(tokens[:p + 1]))
                self.slots[table[p // self.bs], p % self.bs] = kv
            for p in range(st.start_pos, st.start_pos + st.num_tokens):
                first = max(0, p - self.window + 1) if self.window else 0
                for q in range(first, p + 1):
                    got = self.slots.get((table[q // self.bs], q % self.bs))
                    assert got == (seq.cache_salt, tuple(tokens[:q + 1])), (st, q)
            if st.sample:
                tok = token_of(st.seq_id, st.num_generated)
                self.last[st.seq_id] = tok
                sampled.append(SampledToken(st.seq_id, tok))
        return sampled


def check_invariants(s: Scheduler, bm: BlockManager, peak: int):
    counts = [0] * bm.num_blocks
    for q in s.running:
        mine = q.block_table[q.num_released_blocks:]
        assert len(mine) <= peak, (q.seq_id, q.block_table, q.num_released_blocks)
        for i in mine:
            counts[i] += 1
    assert [b.ref_count for b in bm.pool.blocks] == counts
    assert sorted(bm.pool.free_queue()) == [i for i, c in enumerate(counts) if c == 0]
    for h, bid in bm.pool._cached.items():
        assert bm.pool.blocks[bid].hash == h


@pytest.mark.parametrize("window, lookahead", [(8, False), (8, True), (5, True), (0, False)])
def test_random_traffic_reads_only_live_kv(window, lookahead):
    """Shared prompts, chunks, aborts, preemption: no read of a stale slot, ref counts exact."""
    rng = random.Random(window * 10 + lookahead)
    bs, budget = 4, 8
    bm = BlockManager(9 if window else 14, bs, window=window)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=budget, lookahead=lookahead)
    worker = CheckedWorker(bs, window)
    bases = [[rng.randrange(50) for _ in range(30)] for _ in range(3)]
    seqs, inflight, step = [], [], 0
    peak = -(-(window + budget + 1 + bs - 2) // bs) if window else bm.num_blocks
    longest = 60 if window else bm.num_blocks * bs - budget
    while len(seqs) < 30 or s.num_unfinished or inflight:
        if len(seqs) < 30 and rng.random() < 0.3:
            base = rng.choice(bases)
            prompt = base[:rng.randrange(1, 30)] + [rng.randrange(50)
                                                    for _ in range(rng.randrange(4))]
            q = Sequence(len(seqs) + 1, prompt, max_tokens=rng.randrange(1, longest - len(prompt)),
                         cache_salt=rng.choice(["", "", "t"]))
            seqs.append(q)
            s.add(q)
        if seqs and rng.random() < 0.03:
            s.abort(rng.choice(seqs))
        while len(inflight) < (2 if lookahead else 1) and (batch := s.schedule()) is not None:
            inflight.append((batch, worker.run(batch, lambda sid, n: (sid * 7 + n) % 50)))
        if inflight:
            s.postprocess(*inflight.pop(0))
        check_invariants(s, bm, peak)
        step += 1
        assert step < 5000
    assert all(q.is_finished for q in seqs) and bm.num_free_blocks == bm.num_blocks
    assert s.num_preemptions > 0 and bm.hits > 0
    if window:
        assert max(q.num_tokens for q in seqs if q.finish_reason == "length") > bm.num_blocks * bs
