"""Releasing blocks outside the window, end to end on the CPU: the real Scheduler and
BlockManager plan steps for a real stage worker (StageWorkerServicer's GetInfo and step
path over a StageRunner from load_runner) on a tiny Mistral with sliding_window=8, whose KV
cache holds fewer tokens than one sequence; the greedy ids are HF transformers'."""
import asyncio
import collections
import random

import pytest
import torch

from shardline.models.config import ModelConfig
from shardline.models.kv_cache import KVCache
from shardline.protocol.decode_rows import decode_result
from shardline.scheduler.block_manager import UNBOUNDED, BlockManager
from shardline.scheduler.engine import PipelineEngine
from shardline.scheduler.request import Sequence
from shardline.scheduler.scheduler import Scheduler
from shardline.v1 import worker_pb2
from shardline.worker.build import load_runner
from shardline.worker.servicer import StageWorkerServicer, stage_attention_window

from .test_model import hf_greedy

NUM_BLOCKS, BLOCK_SIZE, CHUNK, NEW_TOKENS = 8, 4, 8, 40


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    p1 = [rng.randrange(128) for _ in range(24)]
    p2 = p1[:20] + [rng.randrange(128) for _ in range(4)]     # shares 5 blocks with p1
    p3 = [rng.randrange(128) for _ in range(10)]
    return [p1, p2, p3]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return hf_greedy(tiny_model_dir("mistral-swa"), prompts(), NEW_TOKENS)


def test_stage_attention_window(tiny_model_dir):
    swa = ModelConfig.from_dir(tiny_model_dir("mistral-swa"))
    assert stage_attention_window(swa, 0, 4) == stage_attention_window(swa, 2, 3) == 8
    assert stage_attention_window(ModelConfig.from_dir(tiny_model_dir("llama")), 0, 4) == 0
    qwen = ModelConfig.from_dir(tiny_model_dir("qwen2-swa"))   # windows from layer 2 on
    assert stage_attention_window(qwen, 0, 4) == 0 and stage_attention_window(qwen, 2, 4) == 8


def serve(scheduler: Scheduler, servicer: StageWorkerServicer, arrivals: dict, lookahead: bool):
    """The engine's loop, synchronously: up to 2 steps in flight with lookahead, each plan
    encoded as the engine sends it and run by the worker's step path. Returns the most blocks
    any one sequence held after a step."""
    inflight = collections.deque()
    most, step = 0, 0
    while arrivals or scheduler.num_unfinished or inflight:
        for seq in arrivals.pop(step, []):
            scheduler.add(seq)
        while len(inflight) < (2 if lookahead else 1) and (batch := scheduler.schedule()):
            result, _ = servicer._compute(PipelineEngine._to_pb(batch), False)
            inflight.append((batch, decode_result(result)))
        if inflight:
            scheduler.postprocess(*inflight.popleft())
        most = max([most] + [len(q.block_table) - q.num_released_blocks for q in scheduler.running])
        step += 1
        assert step < 1000
    return most


@pytest.mark.parametrize("lookahead, caching", [(False, True), (True, True), (True, False)],
                         ids=["sync", "lookahead", "no-prefix-cache"])
def test_long_generations_in_a_cache_smaller_than_one_sequence(tiny_model_dir, reference,
                                                              lookahead, caching):
    """Without prefix caching a released block goes to the front of the free queue and is
    rewritten at once: any read of it would change the tokens."""
    path = tiny_model_dir("mistral-swa")
    per_block = KVCache.bytes_per_block(4, BLOCK_SIZE, 2, 16, torch.float32)
    runner = load_runner(path, 0, 4, dtype=torch.float32, kv_cache_bytes=NUM_BLOCKS * per_block,
                         block_size=BLOCK_SIZE)
    servicer = StageWorkerServicer("tiny-mistral-swa")
    servicer.runner = runner
    info = asyncio.run(servicer.GetInfo(worker_pb2.StageInfoRequest(), None))
    assert (info.num_blocks, info.block_size, info.attention_window) == (NUM_BLOCKS, 4, 8)
    bm = BlockManager(info.num_blocks, info.block_size, enable_prefix_caching=caching,
                      window=info.attention_window)
    # one step of CHUNK tokens needs at most 5 blocks, so any length fits; without the window a
    # sequence would be capped at the pool's 32 tokens
    assert bm.seq_capacity_tokens(CHUNK) == UNBOUNDED
    assert BlockManager(NUM_BLOCKS, BLOCK_SIZE).seq_capacity_tokens(CHUNK) == 32
    scheduler = Scheduler(bm, max_num_batched_tokens=CHUNK, lookahead=lookahead)
    p1, p2, p3 = prompts()
    seqs = [Sequence(i + 1, p, max_tokens=NEW_TOKENS) for i, p in enumerate((p1, p2, p3))]
    # p2 comes once p1 has run a while (its first blocks released, cached), p3 later
    most = serve(scheduler, servicer, {0: [seqs[0]], 12: [seqs[1]], 20: [seqs[2]]}, lookahead)
    assert [q.output_token_ids for q in seqs] == reference
    assert all(q.finish_reason == "length" for q in seqs)
    assert seqs[0].num_tokens == 64 > NUM_BLOCKS * BLOCK_SIZE
    assert most <= 5                                    # ceil((8 + 8 + 1 + 2) / 4)
    # a hit on p1's blocks 3, 4 (the window of position 20), past its released blocks 0..2
    assert seqs[1].num_cached_tokens == (20 if caching else 0)
    assert scheduler.num_preemptions > 0                # three sequences of 3 to 5 blocks in 8
    assert bm.num_free_blocks == NUM_BLOCKS
    runner.step([], [q.seq_id for q in seqs], None)
