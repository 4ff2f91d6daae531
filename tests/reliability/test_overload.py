"""Overload against a real stack with a small queue: a full queue refuses at once on both
front doors, saying why; a burst of requests far over what it may hold is answered, every one
of them, either in full or at once with RESOURCE_EXHAUSTED (HTTP 429); nothing else goes wrong,
everything admitted completes, a second identical burst leaves the scheduler's memory where the
first left it, and no burst ever has more requests waiting than --max-queued-requests."""
from __future__ import annotations

import threading

import grpc
import pytest

from shardline.client import Client, build_request
from shardline.client.openai_http import HttpApi
from shardline.v1 import generate_pb2_grpc
from tests.reliability.conftest import RunningStack, wait_for
from tests.reliability.load import rss_bytes

pytestmark = pytest.mark.slow

MAX_QUEUED = 4
MAX_NUM_SEQS = 2
BURST = 64                      # requests fired together, half on each front door
MAX_TOKENS = 16
TIMEOUT_S = 300.0               # each call's deadline: a bound on a hang, never an assertion
OVERLOADED = "the server is overloaded"


@pytest.fixture(scope="module")
def stack(model_dir):
    with RunningStack(model_dir, stages=1, threads=2, dtype="bfloat16", http=True,
                      extra_scheduler=["--max-queued-requests", str(MAX_QUEUED),
                                       "--max-num-seqs", str(MAX_NUM_SEQS)]) as s:
        yield s


def prompt(i: int, token_ids: bool):
    """Request i's prompt: text (tokenized by the scheduler's tokenizer) or token ids."""
    return [100 + i, 2000 + i, 300, 4000] if token_ids else f"Request {i}: tell me about rivers"


def _grpc(client: Client, i: int, token_ids: bool) -> tuple[str, str]:
    """('ok', '') for a complete answer, ('refused', details) for RESOURCE_EXHAUSTED, else
    ('error', what happened)."""
    try:
        kw = {"token_ids": prompt(i, True)} if token_ids else {"prompt": prompt(i, False)}
        out = client.generate(**kw, max_tokens=MAX_TOKENS,
                              ignore_eos=True)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return "refused", e.details()
        return "error", f"{e.code().name}: {e.details()}"
    if (out.finish_reason, len(out.token_ids), out.usage.completion_tokens) != \
            ("length", MAX_TOKENS, MAX_TOKENS):
        return "error", f"incomplete: {out.finish_reason} {len(out.token_ids)} tokens"
    return "ok", ""


def _http(api: HttpApi, i: int, token_ids: bool) -> tuple[str, str]:
    status, body = api.post("/v1/completions", {
        "prompt": prompt(i, token_ids), "max_tokens": MAX_TOKENS,
        "ignore_eos": True, "temperature": 0})
    if status == 429 and body["error"]["type"] == "rate_limit_error":
        return "refused", body["error"]["message"]
    if status != 200:
        return "error", f"HTTP {status}: {body}"
    if (body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]) != \
            ("length", MAX_TOKENS):
        return "error", f"incomplete: {body}"
    return "ok", ""


class QueueWatch:
    """Polls GetStats while a burst runs: the most requests ever seen waiting (a sample of the
    queue's length, so it can miss a moment over the cap but never invent one)."""

    def __init__(self, address: str):
        self.address = address
        self.most_waiting = 0
        self.polls = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with Client(self.address, timeout=30) as c:
            while not self.stop.is_set():
                waiting = sum(r.num_waiting for r in c.stats().replicas)
                self.most_waiting = max(self.most_waiting, waiting)
                self.polls += 1
                self.stop.wait(0.01)            # a poll interval, not a synchronisation

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def burst(stack, token_ids: bool) -> list[tuple[str, str, str]]:
    """(front door, outcome, details) of BURST requests let go together (a barrier), their
    prompts token ids or text."""
    results: list = [None] * BURST
    go = threading.Barrier(BURST)
    api = HttpApi(stack.stack.http_url, timeout=TIMEOUT_S)

    def one(i: int) -> None:
        with Client(stack.address, timeout=TIMEOUT_S) as client:
            client.model_info()             # connected before the barrier
            go.wait()
            if i % 2:
                results[i] = ("http", *_http(api, i, token_ids))
            else:
                results[i] = ("grpc", *_grpc(client, i, token_ids))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def idle(stack) -> bool:
    with Client(stack.address, timeout=30) as c:
        (r,) = c.stats().replicas
    return r.num_running == 0 and r.num_waiting == 0 and r.num_free_blocks == r.num_blocks


def test_a_full_queue_refuses_at_once_on_both_doors(stack):
    """MAX_NUM_SEQS long streams running and MAX_QUEUED waiting: a request on either door is
    refused with the reason, and the queue is as it was."""
    with Client(stack.address, timeout=TIMEOUT_S) as c, \
            grpc.insecure_channel(stack.address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        holders = []
        try:
            for i in range(MAX_NUM_SEQS + MAX_QUEUED):
                holders.append(stub.Generate(build_request(
                    f"Holder {i}: a long story", max_tokens=2000, ignore_eos=True),
                    timeout=TIMEOUT_S))             # the call starts here
                if i < MAX_NUM_SEQS:
                    next(holders[-1])               # running
            wait_for(lambda: c.stats().replicas[0].num_waiting == MAX_QUEUED, 120,
                     f"{MAX_QUEUED} requests to wait")
            with pytest.raises(grpc.RpcError) as e:
                c.generate("One more", max_tokens=4)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            message = e.value.details()
            assert message == (f"{OVERLOADED}: {MAX_QUEUED} requests are waiting "
                               f"(--max-queued-requests {MAX_QUEUED}); retry later"), message
            status, body = HttpApi(stack.stack.http_url).post(
                "/v1/completions", {"prompt": "One more", "max_tokens": 4})
            assert (status, body["error"]["type"], body["error"]["message"]) == \
                (429, "rate_limit_error", message), body
            (r,) = c.stats().replicas
            assert (r.num_running, r.num_waiting) == (MAX_NUM_SEQS, MAX_QUEUED)
        finally:
            for h in holders:
                h.cancel()
    wait_for(lambda: idle(stack), 120, "the holders to end and free their blocks")


def test_a_burst_is_served_or_refused_cleanly_and_memory_stays_flat(stack):
    """Token-id prompts: nothing to tokenize, so each request is queued or refused the moment
    it is checked."""
    scheduler = stack.stack.child("scheduler").proc.pid
    rss = []
    for ramp in range(2):
        results = burst(stack, token_ids=True)
        errors = [r for r in results if r[1] == "error"]
        assert not errors, errors[:5]
        # the first request finds the queue empty; 64 together are more than it may hold
        outcomes = [r[1] for r in results]
        assert "ok" in outcomes and "refused" in outcomes, outcomes
        for door, outcome, details in results:
            if outcome == "refused":
                assert OVERLOADED in details and "--max-queued-requests" in details, details
        wait_for(lambda: idle(stack), 120, "every sequence to end and free its blocks")
        rss.append(rss_bytes(scheduler))
        print(f"ramp {ramp}: {outcomes.count('ok')} of {BURST} served, scheduler RSS "
              f"{rss[-1] / 2**20:.1f} MiB")
    assert rss[1] - rss[0] < 0.10 * rss[0], rss
    assert not stack.stack.dead()


def test_a_burst_never_queues_more_than_the_cap(stack):
    """Text prompts: each request waits for the tokenizer between its arrival and its queueing,
    so a burst's requests are all in that wait together; the cap must hold across it."""
    with QueueWatch(stack.address) as watch:
        results = burst(stack, token_ids=False)
    assert not [r for r in results if r[1] == "error"]
    wait_for(lambda: idle(stack), 120, "every sequence to end and free its blocks")
    print(f"at most {watch.most_waiting} seen waiting in {watch.polls} polls")
    assert watch.most_waiting <= MAX_QUEUED, \
        f"{watch.most_waiting} requests waited at once (--max-queued-requests {MAX_QUEUED})"
