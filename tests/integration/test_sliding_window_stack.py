"""A sliding-window model through the real stack (tokenizer, scheduler and a stage worker as
processes over gRPC): the worker reports its attention window in GetInfo, the scheduler
releases the blocks the window has passed, and a generation longer than the whole KV cache
runs (without the window it would be refused, RESOURCE_EXHAUSTED) with HF's greedy ids."""
from __future__ import annotations

import shutil

from shardline.client import Client

from tests.integration.conftest import RunningStack
from tests.unit.conftest import make_tiny_model
from tests.unit.test_model import hf_greedy

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# 10 blocks of 16 positions (4 layers x 2 KV heads x 16 x float32, K and V: 16 KiB a block)
KV_CACHE = "160KiB"
PROMPTS = [list(range(10, 40)), [5, 9, 77, 3, 120, 64, 1, 2, 3, 4, 99, 100, 7, 8, 9, 10, 11]]
NEW_TOKENS = 170                     # 200 and 187 tokens > the cache's 160


def test_generation_longer_than_the_kv_cache(tmp_path, model_dir):
    path = make_tiny_model(tmp_path / "mistral-swa", "mistral-swa")    # window 8
    for name in TOKENIZER_FILES:                # the default model's: detokenizing only
        try:
            shutil.copy(f"{model_dir}/{name}", path / name)
        except FileNotFoundError:
            pass
    expected = hf_greedy(path, PROMPTS, NEW_TOKENS)
    # steps of 32 tokens: one needs at most ceil((8 + 32 + 14) / 16) = 4 blocks of the 10
    with RunningStack(str(path), stages=1, kv_cache_memory=KV_CACHE,
                      extra_scheduler=["--max-num-batched-tokens", "32"]) as s, \
            Client(s.address) as c:
        for prompt, want in zip(PROMPTS, expected):
            out = c.generate(token_ids=prompt, max_tokens=NEW_TOKENS, ignore_eos=True)
            assert out.token_ids == want
            assert out.finish_reason == "length"
