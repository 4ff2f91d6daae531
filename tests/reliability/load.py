"""Client load for the reliability tests and benchmarks/soak.py: clients on threads mixing the
gRPC and HTTP front doors, streamed and whole answers, short and long prompts, each answer
checked (complete: every requested token, finish reason "length"); and the RSS of a process.
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import grpc

from shardline.client import Client
from shardline.client.openai_http import HttpApi, HttpApiError

WORDS = ("the river garden stone light winter market engine paper signal harbor window "
         "forest number silver orbit lantern copper meadow thunder").split()
KINDS = ("grpc-stream", "grpc-whole", "http-stream", "http-whole", "http-chat")
SYSTEM = "You are a terse assistant. Answer in one short paragraph."


def rss_bytes(pid: int) -> int:
    """The resident set size of process pid (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@dataclass
class Tally:
    """Outcomes so far, by kind of request; errors keep their first few descriptions."""
    done: dict = field(default_factory=lambda: {k: 0 for k in KINDS})
    num_errors: int = 0
    errors: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, kind: str) -> None:
        with self.lock:
            self.done[kind] += 1

    def error(self, kind: str, what: str) -> None:
        with self.lock:
            self.num_errors += 1
            if len(self.errors) < 20:
                self.errors.append(f"{kind}: {what}")

    @property
    def total(self) -> int:
        return sum(self.done.values())


class MixedLoad:
    """`clients` threads, client i sending requests of kind KINDS[(i + n) % 5] for its n-th
    request, prompts of 1 to max_prompt_words words, max_tokens in max_tokens (ignore_eos, so
    each answer must hold exactly that many tokens)."""

    def __init__(self, grpc_address: str, http_url: str, clients: int = 16, seed: int = 0,
                 max_tokens: tuple[int, int] = (16, 64), max_prompt_words: int = 160,
                 timeout_s: float = 300.0):
        self.grpc_address, self.http_url = grpc_address, http_url
        self.clients, self.seed = clients, seed
        self.max_tokens, self.max_prompt_words = max_tokens, max_prompt_words
        self.timeout_s = timeout_s          # each call's deadline: a bound on a hang
        self.tally = Tally()

    def run(self, requests_per_client: Optional[int] = None,
            stop: Optional[threading.Event] = None) -> Tally:
        """Every client sends requests one after another until it has sent
        requests_per_client or stop is set; returns once all are done."""
        threads = [threading.Thread(target=self._client, args=(i, requests_per_client, stop),
                                    daemon=True) for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self.tally

    def _client(self, i: int, limit: Optional[int], stop: Optional[threading.Event]) -> None:
        rng = random.Random(self.seed * 1000 + i)
        api = HttpApi(self.http_url, timeout=self.timeout_s)
        with Client(self.grpc_address, timeout=self.timeout_s) as client:
            n = 0
            while (limit is None or n < limit) and not (stop is not None and stop.is_set()):
                kind = KINDS[(i + n) % len(KINDS)]
                prompt = " ".join(rng.choice(WORDS) for _ in range(
                    rng.randint(1, self.max_prompt_words)))
                max_tokens = rng.randint(*self.max_tokens)
                sampling = {"temperature": 0.8, "seed": rng.randrange(1 << 30)} \
                    if rng.random() < 0.5 else {"temperature": 0.0}
                try:
                    problem = REQUESTS[kind](client, api, prompt, max_tokens, sampling)
                except (grpc.RpcError, HttpApiError, OSError) as exc:
                    problem = f"{type(exc).__name__}: {_describe(exc)}"
                if problem:
                    self.tally.error(kind, problem)
                else:
                    self.tally.ok(kind)
                n += 1


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name} {exc.details()}"
    return str(exc)


def _complete(reason: Optional[str], tokens: int, max_tokens: int) -> str:
    """'' when an answer is complete, else what is wrong with it."""
    if reason != "length" or tokens != max_tokens:
        return f"finish_reason {reason!r}, {tokens} of {max_tokens} tokens"
    return ""


def _grpc_stream(client: Client, api, prompt: str, max_tokens: int, sampling: dict) -> str:
    tokens, reason, usage = 0, None, None
    for chunk in client.stream(prompt, max_tokens=max_tokens, ignore_eos=True, **sampling):
        tokens += len(chunk.token_ids)
        reason, usage = chunk.finish_reason or reason, chunk.usage or usage
    problem = _complete(reason, tokens, max_tokens)
    if not problem and usage.completion_tokens != tokens:
        problem = f"usage says {usage.completion_tokens} tokens, {tokens} came"
    return problem


def _grpc_whole(client: Client, api, prompt: str, max_tokens: int, sampling: dict) -> str:
    out = client.generate(messages=[{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": prompt}],
                          max_tokens=max_tokens, ignore_eos=True, **sampling)
    return _complete(out.finish_reason, len(out.token_ids), max_tokens)


def _http_stream(client, api: HttpApi, prompt: str, max_tokens: int, sampling: dict) -> str:
    reason, usage = None, None
    for event in api.stream("/v1/completions", {
            "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **sampling}):
        for choice in event.get("choices") or ():
            reason = choice.get("finish_reason") or reason
        usage = event.get("usage") or usage
    if usage is None:
        return "no usage event"
    return _complete(reason, usage["completion_tokens"], max_tokens)


def _http_whole(client, api: HttpApi, prompt: str, max_tokens: int, sampling: dict) -> str:
    status, body = api.post("/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                                 "ignore_eos": True, **sampling})
    if status != 200:
        return f"HTTP {status}: {body}"
    return _complete(body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"],
                     max_tokens)


def _http_chat(client, api: HttpApi, prompt: str, max_tokens: int, sampling: dict) -> str:
    status, body = api.post("/v1/chat/completions", {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "ignore_eos": True, **sampling})
    if status != 200:
        return f"HTTP {status}: {body}"
    return _complete(body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"],
                     max_tokens)


REQUESTS: dict[str, Callable[..., str]] = {
    "grpc-stream": _grpc_stream, "grpc-whole": _grpc_whole, "http-stream": _http_stream,
    "http-whole": _http_whole, "http-chat": _http_chat}
