"""The OpenAI-compatible HTTP API of a real stack (stack1 serves it), through the official
`openai` package (sync and async, streaming and not) and raw HTTP: the same tokens as gRPC's
Generate on the same request, usage, logprobs, choices, errors as OpenAI error objects."""
from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.parse

import openai
import pytest

from shardline.client import Client
from shardline.common.model_source import DEFAULT_MODEL

CHAT = [{"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Name three colours."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def api(stack1):
    return openai.OpenAI(base_url=stack1.stack.http_url + "/v1", api_key="unused", max_retries=0)


def raw(stack, method: str, path: str, body=None, headers=None):
    """(status, headers, body bytes) of one HTTP request."""
    u = urllib.parse.urlparse(stack.stack.http_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                   **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


def test_chat_equals_grpc_generate(stack1, api):
    with Client(stack1.address) as c:
        ref = c.generate(messages=CHAT, max_tokens=24, temperature=0)
    r = api.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=24,
                                    temperature=0)
    assert r.object == "chat.completion" and r.model == DEFAULT_MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.usage.prompt_tokens
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens > 0          # the same prompt again


def test_chat_stream_with_usage_matches_the_whole_answer(api):
    whole = api.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=20,
                                        temperature=0, max_completion_tokens=20)
    chunks = list(api.chat.completions.create(
        model=DEFAULT_MODEL, messages=CHAT, max_completion_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_completions_prompts_and_choices(stack1, api):
    with Client(stack1.address) as c:
        ref = c.generate(PROMPT, max_tokens=8, temperature=0)
        ids = c.generate(PROMPT, max_tokens=1).usage.prompt_tokens
    r = api.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    # several prompts (text and token ids) x n: prompt-major choices, each prompt counted once
    token_prompt = list(range(100, 110))
    r = api.completions.create(model=DEFAULT_MODEL, prompt=[PROMPT, "Hello"], max_tokens=8,
                               temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == ref.text
    one = api.completions.create(model=DEFAULT_MODEL, prompt="Hello", max_tokens=8, temperature=0)
    assert r.choices[2].text == r.choices[3].text == one.choices[0].text
    assert r.usage.prompt_tokens == ids + one.usage.prompt_tokens
    r = api.completions.create(model=DEFAULT_MODEL, prompt=token_prompt, max_tokens=4, temperature=0,
                               extra_body={"ignore_eos": True})
    with Client(stack1.address) as c:
        assert r.choices[0].text == c.generate(token_ids=token_prompt, max_tokens=4,
                                               ignore_eos=True).text
    assert r.usage.prompt_tokens == len(token_prompt)


def test_logprobs_equal_grpc(stack1, api):
    with Client(stack1.address) as c:
        ref = c.generate(PROMPT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                         ignore_eos=True)
    r = api.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                               logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.token_logprobs == pytest.approx(list(ref.logprobs), abs=1e-6)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(d) == 3 for d in lp.top_logprobs)
    chat = api.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6
               for t in content)


def test_seeded_sampling_reproducible_and_like_grpc(stack1, api):
    kw = dict(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.95,
              seed=1234)
    a, b = (api.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b
    with Client(stack1.address) as c:
        assert c.generate(PROMPT, max_tokens=12, temperature=0.9, top_p=0.95, seed=1234).text == a


def test_async_client_streams_concurrently(stack1, api):
    async def body():
        client = openai.AsyncOpenAI(base_url=stack1.stack.http_url + "/v1", api_key="unused",
                                    max_retries=0)

        async def one(i):
            stream = await client.completions.create(model=DEFAULT_MODEL, prompt=f"{PROMPT} {i}",
                                                     max_tokens=6, temperature=0, stream=True)
            return "".join([ch.choices[0].text async for ch in stream])
        outs = await asyncio.gather(*(one(i) for i in range(4)))
        await client.close()
        return outs
    outs = asyncio.run(body())
    for i, text in enumerate(outs):
        ref = api.completions.create(model=DEFAULT_MODEL, prompt=f"{PROMPT} {i}", max_tokens=6,
                                     temperature=0)
        assert text == ref.choices[0].text


def test_errors_are_openai_error_objects(stack1, api):
    with pytest.raises(openai.NotFoundError) as e:
        api.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model=DEFAULT_MODEL, prompt="x", temperature=3)
    assert "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, presence_penalty=0.5)
    assert e.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=10 ** 6)
    assert "max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=DEFAULT_MODEL, prompt=[10 ** 7], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=DEFAULT_MODEL, prompt="x", n=17)
    status, _, body = raw(stack1, "POST", "/v1/completions", b"{not json")
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, _, body = raw(stack1, "POST", "/v1/completions", {"model": DEFAULT_MODEL})
    assert status == 400 and json.loads(body)["error"]["param"] == "prompt"
    status, _, body = raw(stack1, "GET", "/v1/nothing-here")
    assert status == 404 and "error" in json.loads(body)
    status, _, body = raw(stack1, "GET", "/health")
    assert status == 200
    status, _, body = raw(stack1, "GET", "/v1/models")
    (m,) = json.loads(body)["data"]
    assert status == 200 and m["id"] == DEFAULT_MODEL and m["max_model_len"] > 0


def test_request_ids_are_returned_and_priority_is_accepted(stack1):
    body = {"model": DEFAULT_MODEL, "prompt": PROMPT, "max_tokens": 2, "priority": 5}
    status, headers, out = raw(stack1, "POST", "/v1/completions", body,
                               {"X-Request-Id": "client-id-1"})
    assert status == 200 and headers["x-request-id"] == "client-id-1"
    status, headers, out = raw(stack1, "POST", "/v1/completions", {**body, "stream": True})
    assert status == 200 and headers["x-request-id"].startswith("cmpl-")
    assert json.loads(out.decode().split("\n\n")[0][6:])["id"] == headers["x-request-id"]
    status, _, out = raw(stack1, "POST", "/v1/completions", {**body, "priority": 10 ** 6})
    assert status == 400 and json.loads(out)["error"]["param"] == "priority"


def test_raw_sse_and_a_dropped_stream_frees_its_blocks(stack1):
    status, headers, body = raw(stack1, "POST", "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 5, "temperature": 0, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"

    with Client(stack1.address) as c:
        info = c.model_info()
        steps_before = c.stats().replicas[0].num_steps
    max_tokens = min(info.max_context, info.num_blocks * info.block_size) - 64
    u = urllib.parse.urlparse(stack1.stack.http_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({
        "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}),
        headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")   # generating now
    conn.close()                                                          # the client goes away
    with Client(stack1.address) as c:
        deadline = time.monotonic() + 60
        while True:
            (rep,) = c.stats().replicas
            if rep.num_running == 0 and rep.num_free_blocks == rep.num_blocks:
                break
            assert time.monotonic() < deadline, "the dropped stream's blocks were never freed"
            time.sleep(0.05)
        # aborted, not run to its end: far fewer steps than the tokens it asked for
        assert c.stats().replicas[0].num_steps - steps_before < max_tokens / 2
