"""Fuzzing the public Generate API of a real stack with hypothesis: GenerateRequests built from
every field with odd values (negative and huge integers, NaN and infinite floats, empty and
long strings, ids outside the vocabulary, unknown roles, too many stop strings), and raw bytes
(random, or a valid request mutated) as the serialized request. Every answer is a complete
stream or a clean refusal (a code naming the caller's mistake, a message without a channel's
debug string or a traceback); afterwards the stack is healthy and a greedy request answers as
it did before. Derandomized, a bounded number of examples: the same run every time."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shardline.v1 import common_pb2, generate_pb2
from tests.reliability.conftest import RunningStack, health_status, raw_generate

pytestmark = pytest.mark.slow

MAX_TOKENS_CAP = 8              # the stack's --max-tokens-cap: every accepted request is short
VOCAB = 49152                   # the default model's vocabulary
TIMEOUT_S = 120.0               # each call's deadline: a bound on a hang, never an assertion
CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.OUT_OF_RANGE}
LEAKED = ("debug_error_string", "Traceback", "AioRpcError", "grpc_status", "Exception")
GREEDY = generate_pb2.GenerateRequest(text="The capital of France is", max_tokens=MAX_TOKENS_CAP)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

def mostly(valid, odd):
    """Values of `valid` (extreme ones included), one time in five values of `odd`: each field
    is odd alone often enough that requests get past the first check to the engine."""
    return st.integers(0, 4).flatmap(lambda k: odd if k == 0 else valid)


INT32 = st.integers(-2**31, 2**31 - 1)
FLOAT = st.one_of(st.floats(width=32),                  # NaN, +-inf, subnormals, huge
                  st.sampled_from([-1.0, -0.0, float("nan"), float("inf"), -float("inf")]))
EXTREME_POSITIVE = st.sampled_from([1.401298464324817e-45, 1e-30, 1e-6, 1e30, 3.4e38])
TEXT = st.one_of(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=3000),
                 st.text(alphabet="ab \n\u00e9\u4e2d\U0001f600", min_size=2000, max_size=5000))
ROLES = ["system", "user", "assistant", "tool"]

MAX_TOKENS = mostly(st.integers(0, MAX_TOKENS_CAP), st.one_of(INT32, st.integers(-2, 12)))
STOPS = mostly(st.lists(st.text(max_size=20), max_size=4),
               st.lists(st.text(max_size=300), max_size=20))
PRIORITY = mostly(st.integers(-1000, 1000), st.one_of(INT32, st.sampled_from([-1001, 1001])))
REQUEST_ID = mostly(st.one_of(st.just(""), st.from_regex(r"[!-~]{1,128}", fullmatch=True)),
                    st.one_of(st.text(max_size=200), st.from_regex(r"[!-~]{129,140}",
                                                                   fullmatch=True)))
TEMPERATURE = mostly(st.one_of(st.floats(0, 2, width=32), st.just(0.0), EXTREME_POSITIVE),
                     FLOAT)
TOP_P = mostly(st.one_of(st.floats(1.401298464324817e-45, 1, width=32), st.just(1.0), EXTREME_POSITIVE.filter(
    lambda x: x <= 1)), FLOAT)
TOP_K = mostly(st.one_of(st.integers(0, 100), st.just(2**31 - 1)), INT32)
PENALTY = mostly(st.one_of(st.floats(0.5, 2, width=32), EXTREME_POSITIVE), FLOAT)
TOP_LOGPROBS = mostly(st.integers(-5, 20), st.one_of(INT32, st.just(21)))
ROLE = mostly(st.sampled_from(ROLES), st.one_of(st.sampled_from(["", "wizard", "USER"]),
                                                st.text(max_size=12)))
TOKEN_ID = mostly(st.integers(0, VOCAB - 1), st.one_of(INT32, st.sampled_from([-1, VOCAB])))


@st.composite
def sampling_params(draw) -> common_pb2.SamplingParams:
    s = common_pb2.SamplingParams(temperature=draw(TEMPERATURE), top_k=draw(TOP_K),
                                  seed=draw(st.integers(0, 2**64 - 1)), has_seed=draw(st.booleans()),
                                  top_logprobs=draw(TOP_LOGPROBS), logprobs=draw(st.booleans()))
    if draw(st.booleans()):
        s.top_p = draw(TOP_P)
    if draw(st.booleans()):
        s.repetition_penalty = draw(PENALTY)
    return s


@st.composite
def generate_requests(draw) -> generate_pb2.GenerateRequest:
    req = generate_pb2.GenerateRequest(max_tokens=draw(MAX_TOKENS), stop=draw(STOPS),
                                       ignore_eos=draw(st.booleans()), priority=draw(PRIORITY),
                                       request_id=draw(REQUEST_ID))
    if draw(st.booleans()):
        req.sampling.CopyFrom(draw(sampling_params()))
    kind = draw(mostly(st.sampled_from(["text", "messages", "token_ids"]),
                       st.sampled_from(["none", "empty text", "empty messages", "empty ids"])))
    if kind in ("text", "empty text"):
        req.text = draw(TEXT) if kind == "text" else ""
    elif kind in ("messages", "empty messages"):
        size = (1, 6) if kind == "messages" else (0, 0)
        for role, content in draw(st.lists(st.tuples(ROLE, TEXT), min_size=size[0],
                                           max_size=size[1])):
            req.messages.messages.add(role=role, content=content)
        req.messages.SetInParent()          # an empty list is still the messages prompt
    elif kind in ("token_ids", "empty ids"):
        size = (1, 64) if kind == "token_ids" else (0, 0)
        req.token_ids.ids.extend(draw(st.lists(TOKEN_ID, min_size=size[0], max_size=size[1])))
        req.token_ids.SetInParent()
    return req


@st.composite
def raw_payloads(draw) -> bytes:
    """Random bytes; valid single-field encodings joined in any order (a field given twice,
    two prompts: protobuf keeps the last); or a valid request's bytes with some flipped, cut
    or inserted."""
    kind = draw(st.sampled_from(["random", "spliced", "mutated"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "spliced":
        return b"".join(draw(st.lists(st.sampled_from(FIELD_PAYLOADS), min_size=1, max_size=8)))
    base = bytearray(draw(st.sampled_from(VALID_PAYLOADS)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(base)))
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and at < len(base):
            base[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del base[at:at + draw(st.integers(1, 8))]
        else:
            base[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(base)


FIELD_PAYLOADS = [generate_pb2.GenerateRequest(**kw).SerializeToString() for kw in (
    {"text": "Hello"}, {"text": "\u4e2d\u6587 and \U0001f600"},
    {"token_ids": generate_pb2.TokenIds(ids=[5, 6, 7])},
    {"token_ids": generate_pb2.TokenIds(ids=[VOCAB])},
    {"messages": generate_pb2.ChatMessages(messages=[generate_pb2.ChatMessage(role="user",
                                                                              content="Hi")])},
    {"max_tokens": 3}, {"max_tokens": -1}, {"max_tokens": 2**31 - 1}, {"stop": ["e"]},
    {"stop": [""] * 20}, {"ignore_eos": True}, {"request_id": "spliced"}, {"priority": -7},
    {"sampling": common_pb2.SamplingParams(temperature=0.9, top_p=0.5, seed=1, has_seed=True)},
    {"sampling": common_pb2.SamplingParams(temperature=1e-30, repetition_penalty=1e30)},
    {"sampling": common_pb2.SamplingParams(logprobs=True, top_logprobs=20, top_k=1)},
)]
VALID_PAYLOADS = [r.SerializeToString() for r in (
    GREEDY,
    generate_pb2.GenerateRequest(token_ids=generate_pb2.TokenIds(ids=[1, 2, 3, 400]),
                                 max_tokens=4, stop=["x", "y"],
                                 sampling=common_pb2.SamplingParams(temperature=0.7, top_k=5,
                                                                    seed=3, has_seed=True)),
    generate_pb2.GenerateRequest(messages=generate_pb2.ChatMessages(messages=[
        generate_pb2.ChatMessage(role="user", content="Hi")]), max_tokens=3,
        request_id="fuzz-1", priority=5),
)]


@pytest.fixture(scope="module")
def stack(model_dir):
    with RunningStack(model_dir, stages=1, threads=2, dtype="bfloat16",
                      extra_scheduler=["--max-tokens-cap", str(MAX_TOKENS_CAP)]) as s:
        yield s


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(stack.address) as ch:
        yield ch


def call(ch: grpc.Channel, payload: bytes) -> tuple[grpc.StatusCode, str, list]:
    return raw_generate(ch, payload, TIMEOUT_S)


def check_answer(code: grpc.StatusCode, details: str, out: list) -> None:
    event(f"{code.name}: {details[:40]}")
    if code == grpc.StatusCode.OK:
        assert out and out[-1].finish_reason in ("stop", "length"), out
        assert not any(r.finish_reason for r in out[:-1]), out
        tokens = sum(len(r.token_ids) for r in out)
        assert tokens == out[-1].usage.completion_tokens <= MAX_TOKENS_CAP, out[-1]
        return
    assert code in CLEAN, (code, details)
    assert details and not out, (code, details, out)
    for leak in LEAKED:
        assert leak not in details, details


@pytest.fixture(scope="module")
def reference(channel) -> str:
    code, details, out = call(channel, GREEDY.SerializeToString())
    assert code == grpc.StatusCode.OK, details
    return "".join(r.text for r in out)


@given(req=generate_requests())
@FUZZ
def test_fuzzed_requests_get_an_answer_or_a_clean_refusal(channel, reference, req):
    check_answer(*call(channel, req.SerializeToString()))


@given(payload=raw_payloads())
@FUZZ
def test_fuzzed_bytes_get_an_answer_or_a_clean_refusal(channel, reference, payload):
    check_answer(*call(channel, payload))


def test_the_stack_is_unharmed_by_the_fuzzing(stack, channel, reference):
    assert health_status(stack.address) == health_pb2.HealthCheckResponse.SERVING
    assert not stack.stack.dead()
    code, details, out = call(channel, GREEDY.SerializeToString())
    assert code == grpc.StatusCode.OK, details
    assert "".join(r.text for r in out) == reference
    for child in ("scheduler", "tokenizer", "worker-0"):
        tail = "".join(stack.stack.child(child).tail)
        assert "Traceback" not in tail, f"{child}:\n{tail}"
