"""Model families through the real stack (tokenizer, scheduler and stage workers as processes
over gRPC): greedy ids equal HF transformers' float32 on tiny random checkpoints made from a
config (no hub), with prompts longer than the sliding windows, on 1 and 2 stages."""
from __future__ import annotations

import shutil

import grpc
import pytest

from shardline.client import Client

from tests.integration.conftest import RunningStack
from tests.unit.conftest import make_tiny_model
from tests.unit.test_model import hf_greedy

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# ids < 128 (the tiny vocabulary); 30 and 21 tokens against 8-token windows
PROMPTS = [list(range(10, 40)), [5, 9, 77, 3, 120, 64, 1, 2, 3, 4, 99, 100, 7, 8, 9, 10, 11,
                                 12, 13, 14, 15]]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, model_dir):
    made = {}

    def get(family: str) -> str:
        if family not in made:
            path = make_tiny_model(tmp_path_factory.mktemp(f"stack-{family}"), family)
            for name in TOKENIZER_FILES:          # the default model's: detokenizing only
                src = f"{model_dir}/{name}"
                try:
                    shutil.copy(src, path / name)
                except FileNotFoundError:
                    pass
            made[family] = str(path)
        return made[family]
    return get


@pytest.mark.parametrize("family,stages", [("gemma2", 1), ("gemma3", 2), ("qwen3-moe", 1),
                                           ("mixtral", 2)])
def test_greedy_through_the_stack_equals_hf(family_dir, family, stages):
    path = family_dir(family)
    expected = hf_greedy(path, PROMPTS, NEW_TOKENS)
    with RunningStack(path, stages=stages, kv_cache_memory="8MiB") as s, \
            Client(s.address) as c:
        for prompt, want in zip(PROMPTS, expected):
            out = c.generate(token_ids=prompt, max_tokens=NEW_TOKENS, ignore_eos=True)
            assert out.token_ids == want, (family, stages, prompt)
        if stages == 1:
            # the default tokenizer's ids run past this model's 128 rows: refused up front,
            # and the replica keeps serving
            with pytest.raises(grpc.RpcError) as err:
                c.generate("The capital of France is", max_tokens=4)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "vocabulary" in err.value.details()
            out = c.generate(token_ids=PROMPTS[0], max_tokens=NEW_TOKENS, ignore_eos=True)
            assert out.token_ids == expected[0]


def test_longrope_through_the_stack_equals_hf(family_dir):
    """Phi-3 with LongRoPE switching at 32 tokens: a 40-token prompt on the long factors from
    the start, a 25-token one that grows past 32 (HF recomputes it on the long factors; the
    scheduler preempts and recomputes it), a 5-token one that stays short."""
    path = family_dir("phi3-longrope")
    prompts = [list(range(10, 50)), list(range(60, 85)), [5, 6, 7, 8, 9]]
    expected = hf_greedy(path, prompts, NEW_TOKENS)
    with RunningStack(path, stages=2, kv_cache_memory="8MiB") as s, Client(s.address) as c:
        for prompt, want in zip(prompts, expected):
            out = c.generate(token_ids=prompt, max_tokens=NEW_TOKENS, ignore_eos=True)
            assert out.token_ids == want, prompt
