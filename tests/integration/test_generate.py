"""End to end over real gRPC: greedy output equals HF transformers, stages, batching,
seeds, cancellation and block accounting."""
from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest
import torch

from shardline.client import Client

N = 32
RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]
CHATS = [
    [{"role": "user", "content": "What is the tallest mountain on Earth?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
]


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tok, model


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding with HF's forward and KV cache (no generate() stop logic)."""
    out = []
    with torch.inference_mode():
        res = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            res = model(torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True)
    return out


def chat_ids(tok, messages):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_greedy_equals_hf_raw_and_chat(stack1, hf):
    tok, model = hf
    with Client(stack1.address) as c:
        for p in RAW_PROMPTS:
            ids = tok(p)["input_ids"]
            out = c.generate(p, max_tokens=N, ignore_eos=True)
            assert out.usage.prompt_tokens == len(ids)
            assert out.token_ids == hf_greedy(model, ids, N), p
            assert out.finish_reason == "length" and out.usage.completion_tokens == N
        for m in CHATS:
            ids = chat_ids(tok, m)
            out = c.generate(messages=m, max_tokens=N, ignore_eos=True)
            assert out.usage.prompt_tokens == len(ids)
            assert out.token_ids == hf_greedy(model, ids, N), m


def test_stream_text_matches_tokens(stack1, hf):
    tok, _ = hf
    with Client(stack1.address) as c:
        chunks = list(c.stream("Write a haiku about the sea:", max_tokens=24, ignore_eos=True))
    ids = [t for ch in chunks for t in ch.token_ids]
    assert "".join(ch.text for ch in chunks) == tok.decode(ids, skip_special_tokens=True)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(ids) == 24
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_stops_at_eos(stack1):
    with Client(stack1.address) as c:
        out = c.generate(messages=[{"role": "user", "content": "Say hello."}], max_tokens=200)
    assert out.finish_reason == "stop" and out.usage.completion_tokens < 200


def test_one_two_three_stages_identical(stack1, stack3, model_dir):
    from tests.integration.conftest import RunningStack
    prompts = RAW_PROMPTS[:2]
    with Client(stack1.address) as c:
        ref = [c.generate(p, max_tokens=N, ignore_eos=True).token_ids for p in prompts]
    with Client(stack3.address) as c:
        assert [c.generate(p, max_tokens=N, ignore_eos=True).token_ids for p in prompts] == ref
    with RunningStack(model_dir, stages=2) as s2, Client(s2.address) as c:
        assert [c.generate(p, max_tokens=N, ignore_eos=True).token_ids for p in prompts] == ref


def test_alone_equals_among_eight_concurrent(stack1, stack3):
    prompts = [f"Question {i}: why is the sky blue? Answer:" if i % 2 else RAW_PROMPTS[i % 3]
               for i in range(8)]
    for stack in (stack1, stack3):
        with Client(stack.address) as c:
            alone = [c.generate(p, max_tokens=N, ignore_eos=True).token_ids for p in prompts]
            with concurrent.futures.ThreadPoolExecutor(8) as ex:
                together = list(ex.map(lambda p: c.generate(p, max_tokens=N, ignore_eos=True).token_ids,
                                       prompts))
        assert together == alone


def test_seeded_sampling_reproducible(stack1, stack3):
    kw = dict(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, ignore_eos=True)
    with Client(stack1.address) as c:
        a = c.generate("My favourite food is", seed=1234, **kw).token_ids
        b = c.generate("My favourite food is", seed=1234, **kw).token_ids
        d = c.generate("My favourite food is", seed=999, **kw).token_ids
        with concurrent.futures.ThreadPoolExecutor(4) as ex:   # batch composition must not matter
            many = list(ex.map(lambda s: c.generate("My favourite food is", seed=s, **kw).token_ids,
                               [1234, 5, 6, 1234]))
    assert a == b == many[0] == many[3]
    assert a != d
    with Client(stack3.address) as c:                          # nor the pipeline shape
        assert c.generate("My favourite food is", seed=1234, **kw).token_ids == a


def test_stop_string(stack1):
    with Client(stack1.address) as c:
        full = c.generate("1, 2, 3, 4, 5,", max_tokens=20, ignore_eos=True)
        assert " 7," in full.text
        cut = c.generate("1, 2, 3, 4, 5,", max_tokens=20, ignore_eos=True, stop=[" 7,"])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(" 7,")]


def test_logprobs_returned(stack1):
    with Client(stack1.address) as c:
        out = c.generate("Hello", max_tokens=5, logprobs=True, ignore_eos=True)
    assert len(out.logprobs) == 5 and all(lp <= 0 for lp in out.logprobs)


def free_blocks(c):
    r = c.stats().replicas[0]
    return r.num_free_blocks, r.num_blocks, r.num_running + r.num_waiting


def wait_all_free(c, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        free, total, live = free_blocks(c)
        if free == total and live == 0:
            return True
        time.sleep(0.05)
    return False


def test_blocks_free_after_finish_and_cancel(stack1):
    with Client(stack1.address) as c:
        c.generate("Count to ten:", max_tokens=10, ignore_eos=True)
        assert wait_all_free(c)
        stream = c.stream("Tell me a very long story about dragons.", max_tokens=500, ignore_eos=True)
        next(stream)
        next(stream)
        free, total, live = free_blocks(c)
        assert free < total and live == 1
        stream.close()                                   # client goes away mid-stream
        assert wait_all_free(c, timeout=5.0)
    with Client(stack1.address, timeout=0.5) as c:       # deadline passes mid-stream
        with pytest.raises(grpc.RpcError) as e:
            c.generate("Another long story:", max_tokens=1000, ignore_eos=True)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with Client(stack1.address) as c:
        assert wait_all_free(c, timeout=5.0)


BAD = [
    (dict(prompt=""), "empty"),
    (dict(prompt="hi", max_tokens=-1), "max_tokens"),
    (dict(prompt="hi", max_tokens=100000), "max_tokens"),
    (dict(prompt="hi", temperature=-0.5), "temperature"),
    (dict(prompt="hi", temperature=float("nan")), "temperature"),
    (dict(prompt="hi", top_p=0.0), "top_p"),
    (dict(prompt="hi", top_p=1.5), "top_p"),
    (dict(prompt="word " * 9000), "context"),
    (dict(messages=[]), "messages"),
    (dict(token_ids=[10 ** 7]), "token_ids"),
]


def test_bad_input_is_invalid_argument_and_harms_nobody(stack1):
    with Client(stack1.address) as c:
        bystander = c.stream("The history of Rome:", max_tokens=40, ignore_eos=True)
        first = next(bystander)
        for kwargs, needle in BAD:
            with pytest.raises(grpc.RpcError) as e:
                c.generate(**kwargs)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (kwargs, e.value.details())
            assert needle in e.value.details(), (needle, e.value.details())
        rest = list(bystander)
        assert sum(len(ch.token_ids) for ch in [first, *rest]) == 40
        assert rest[-1].finish_reason == "length"
        # prompt + max_tokens beyond the context
        info = c.model_info()
        with pytest.raises(grpc.RpcError) as e:
            c.generate(token_ids=[1] * (info.max_context - 10), max_tokens=20)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in e.value.details()
