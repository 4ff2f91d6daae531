"""Supervision by the real `shardline up`: a worker SIGKILLed under 8 running streams loses
none of them, is restarted by `up`, rejoins its replica and serves again; so does the
tokenizer under 4 streams; SIGTERM then stops the whole stack cleanly."""
from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

from shardline.client import Client
from tests.reliability.conftest import UpProcess, wait_for

MAX_TOKENS = 64
LONG = 300                   # tokens of a stream that outlives a tokenizer restart
PROMPTS = [f"Story number {i}: once upon a time" for i in range(8)]     # no shared full block


def replicas(c: Client) -> dict[int, object]:
    return {int(r.replica): r for r in c.stats().replicas}


def test_killed_worker_is_restarted_and_no_stream_is_lost(model_dir):
    with UpProcess(["--model", model_dir, "--replicas", "2", "--threads", "1",
                    "--dtype", "float32", "--kv-cache-memory", "64MiB"]) as up:
        started = [threading.Event() for _ in PROMPTS]

        def run(i: int):
            with Client(up.address, timeout=300) as c:
                ids, last = [], None
                for chunk in c.stream(PROMPTS[i], max_tokens=MAX_TOKENS, ignore_eos=True):
                    ids += chunk.token_ids
                    last = chunk
                    started[i].set()
                return ids, last

        with Client(up.address) as c, ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(run, i) for i in range(len(PROMPTS))]
            for i, ev in enumerate(started):
                wait_for(lambda: ev.is_set() or futures[i].done(), 120, f"stream {i} to start")
            wait_for(lambda: replicas(c)[1].num_running, 60, "replica 1 to run sequences")
            os.kill(up.worker_pid(1), signal.SIGKILL)
            for f in futures:                    # every accepted stream completes, whole
                ids, last = f.result(timeout=300)
                assert len(ids) == MAX_TOKENS
                assert last.finish_reason == "length"
                assert last.usage.completion_tokens == MAX_TOKENS
            up.wait_line("worker-r1s0 exited with -9; restarting in 1.0s (restart 1)", 60)
            # the restarted worker rejoins its replica ...
            wait_for(lambda: all(r.healthy for r in replicas(c).values()), 180,
                     "replica 1 to be healthy again")
            # ... and serves: routing ties go to replica 0, so with a long stream running
            # there the next request is replica 1's
            first = c.stream("Tell me about rivers.", max_tokens=1000, ignore_eos=True)
            next(first)
            second = c.generate("Tell me about mountains.", max_tokens=16, ignore_eos=True)
            first.close()
            assert second.finish_reason == "length" and len(second.token_ids) == 16
            assert replicas(c)[1].num_tokens > 0        # work of its engine since the restart

            # the tokenizer too: streams under way resend their detokenize batch to the
            # restarted one and finish whole, with text decoded after the restart
            killed = threading.Event()

            def long_run(i: int):
                with Client(up.address, timeout=300) as c2:
                    n, after, last = 0, 0, None
                    for chunk in c2.stream(PROMPTS[i], max_tokens=LONG, ignore_eos=True):
                        n += len(chunk.token_ids)
                        after += len(chunk.token_ids) if killed.is_set() else 0
                        last = chunk
                        started[i].set()
                    return n, after, last

            for ev in started:
                ev.clear()
            futures = [pool.submit(long_run, i) for i in range(4)]
            for i in range(4):
                wait_for(lambda: started[i].is_set() or futures[i].done(), 120,
                         f"stream {i} to start")
            (tok,) = [pid for pid, argv in up.children().items() if "tokenizer" in argv]
            os.kill(tok, signal.SIGKILL)
            killed.set()
            for f in futures:
                n, after, last = f.result(timeout=300)
                assert n == LONG and last.finish_reason == "length"
                assert after > 0
            up.wait_line("tokenizer exited with -9; restarting", 60)
        assert up.stop() == 0
        up.wait_line("shardline up: stopped", 10)
