"""Requests that end early on a real stack give back everything they held: gRPC streams the
client cancels mid-generation, gRPC calls whose deadline passes mid-generation, and HTTP
clients that hang up before their whole (non-streamed) answer is ready. Afterwards nothing
runs or waits and every KV block is free again (blocks keeping prefix-cache content count as
free: nobody holds them, and they are evicted on demand)."""
from __future__ import annotations

import asyncio
import json
import socket
import urllib.parse

import grpc
import pytest

from shardline.client import Client, build_request
from shardline.v1 import generate_pb2_grpc
from tests.reliability.conftest import RunningStack, wait_for

pytestmark = pytest.mark.slow

LONG = 4000                     # max_tokens no request here can reach before it is ended
DEADLINE_S = 5.0                # far short of LONG tokens, long past a first token
WAVES, PER_WAVE = 5, 10         # 50 cancels
DEADLINES = 50
DISCONNECTS = 10
TIMEOUT_S = 300.0               # a bound on a hang, never an assertion


@pytest.fixture(scope="module")
def stack(model_dir):
    with RunningStack(model_dir, stages=1, threads=2, dtype="bfloat16", http=True,
                      kv_cache_memory="256MiB") as s:
        yield s


def replica(stack):
    with Client(stack.address, timeout=30) as c:
        (r,) = c.stats().replicas
    return r


def all_free(stack) -> bool:
    r = replica(stack)
    return r.num_running == 0 and r.num_waiting == 0 and r.num_free_blocks == r.num_blocks


def wait_all_free(stack, what: str) -> None:
    wait_for(lambda: all_free(stack), 120, f"every block to be free after {what}")
    assert replica(stack).num_free_blocks == replica(stack).num_blocks


async def cancel_wave(address: str, wave: int) -> list[tuple[int, grpc.StatusCode]]:
    """PER_WAVE streams at once, stream i cancelled after its (1 + i % 4)-th chunk: (chunks
    read, final code) of each."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)

        async def one(i: int):
            call = stub.Generate(build_request(f"Wave {wave}, story {i}: once upon a time",
                                               max_tokens=LONG, ignore_eos=True),
                                 timeout=TIMEOUT_S)
            chunks = 0
            async for _ in call:
                chunks += 1
                if chunks == 1 + i % 4:
                    break
            call.cancel()
            return chunks, await call.code()

        return await asyncio.gather(*(one(i) for i in range(PER_WAVE)))


def test_cancelled_streams_free_their_blocks(stack):
    for wave in range(WAVES):
        for i, (chunks, code) in enumerate(asyncio.run(cancel_wave(stack.address, wave))):
            assert chunks == 1 + i % 4
            assert code == grpc.StatusCode.CANCELLED
    wait_all_free(stack, f"{WAVES * PER_WAVE} cancels")


async def deadline_wave(address: str) -> list[tuple[int, grpc.StatusCode]]:
    """DEADLINES calls at once, each with a deadline it cannot meet: (chunks, code) of each."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)

        async def one(i: int):
            call = stub.Generate(build_request(f"Story {i}: it was a dark night",
                                               max_tokens=LONG, ignore_eos=True),
                                 timeout=DEADLINE_S)
            chunks = 0
            try:
                async for _ in call:
                    chunks += 1
            except grpc.RpcError:
                pass
            return chunks, await call.code()

        return await asyncio.gather(*(one(i) for i in range(DEADLINES)))


def test_expired_deadlines_free_their_blocks(stack):
    before = replica(stack).num_tokens
    results = asyncio.run(deadline_wave(stack.address))
    assert [code for _, code in results] == [grpc.StatusCode.DEADLINE_EXCEEDED] * DEADLINES
    # the calls were cut short while generating (a first token comes long before the deadline)
    assert sum(chunks > 0 for chunks, _ in results) > 0, results
    wait_all_free(stack, f"{DEADLINES} expired deadlines")
    computed = replica(stack).num_tokens - before
    print(f"{sum(chunks > 0 for chunks, _ in results)} of {DEADLINES} streamed before their "
          f"deadline; {computed} tokens computed")
    assert computed < DEADLINES * LONG


def _post_and_hold(url: str, body: dict) -> socket.socket:
    """A socket that has sent one whole POST /v1/completions and reads nothing."""
    u = urllib.parse.urlsplit(url)
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    sock = socket.create_connection((u.hostname, u.port), timeout=TIMEOUT_S)
    sock.sendall(head + data)
    return sock


def test_http_clients_that_hang_up_free_their_blocks(stack):
    """Non-streamed completions whose clients close the connection once their sequences run:
    the server stops generating for them (it would otherwise run each to LONG tokens)."""
    before = replica(stack).num_tokens
    socks = [_post_and_hold(stack.stack.http_url, {
        "prompt": f"Client {i}: a long tale", "max_tokens": LONG, "ignore_eos": True,
        "temperature": 0}) for i in range(DISCONNECTS)]
    try:
        wait_for(lambda: replica(stack).num_running == DISCONNECTS, 120,
                 f"{DISCONNECTS} HTTP requests to run")
    finally:
        for s in socks:
            s.shutdown(socket.SHUT_RDWR)
            s.close()
    wait_all_free(stack, f"{DISCONNECTS} HTTP clients hung up")
    computed = replica(stack).num_tokens - before
    print(f"{computed} tokens computed for {DISCONNECTS} abandoned HTTP requests")
    assert computed < DISCONNECTS * LONG


def test_the_stack_still_serves(stack):
    with Client(stack.address, timeout=TIMEOUT_S) as c:
        out = c.generate("The capital of France is", max_tokens=8, ignore_eos=True)
    assert (out.finish_reason, len(out.token_ids)) == ("length", 8)
    assert not stack.stack.dead()
