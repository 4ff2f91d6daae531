"""Bad input against a real stack (every service its own process, real gRPC and HTTP on
localhost): each is refused before any work with the right code or HTTP status and a clean
message (never a channel's debug string), one WARNING line, no traceback; oversized messages
are refused unread and leave the receiver's memory where it was; a good request right after
still succeeds."""
from __future__ import annotations

import http.client
import json
import urllib.parse

import grpc
import pytest

from shardline.common.model_source import DEFAULT_MODEL
from shardline.common.request_limits import (BYTES_LIMIT_CONTEXT_TOKENS, MAX_CHAT_MESSAGES,
                                             MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS,
                                             prompt_chars, request_bytes, step_message_bytes)
from shardline.v1 import generate_pb2, tokenizer_pb2
from tests.reliability.conftest import RunningStack, raw_generate, wait_for

pytestmark = pytest.mark.slow

MODEL_CONTEXT = 8192                  # the default model's max_position_embeddings
MODEL_HIDDEN = 576                    # and its hidden_size
MAX_CHARS = prompt_chars(MODEL_CONTEXT)
TIMEOUT_S = 120.0                     # a deadline for each call, never an assertion
LEAKED = ("debug_error_string", "AioRpcError", "Traceback", "grpc_status")
OVERSIZED_BYTES = 512 << 20


@pytest.fixture(scope="module")
def stack(model_dir):
    with RunningStack(model_dir, stages=1, threads=2, http=True) as s:
        yield s


@pytest.fixture(scope="module")
def scheduler(stack):
    with grpc.insecure_channel(stack.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def tokenizer(stack):
    with grpc.insecure_channel(_address_of(stack, "tokenizer")) as ch:
        yield ch


def _address_of(stack, child: str) -> str:
    argv = stack.stack.child(child).argv
    return f"127.0.0.1:{argv[argv.index('--port') + 1]}"


def _token(stack) -> tuple:
    return (("authorization", f"Bearer {stack.stack.cluster_token}"),)


def _clean(message: str) -> None:
    for s in LEAKED:
        assert s not in message, message


# -- gRPC: Generate on the scheduler ---------------------------------------------------------
def generate(ch: grpc.Channel, payload: bytes) -> tuple[grpc.StatusCode, str, list]:
    return raw_generate(ch, payload, TIMEOUT_S)


def request(**kw) -> bytes:
    kw.setdefault("max_tokens", 4)
    return generate_pb2.GenerateRequest(**kw).SerializeToString()


def chat(messages) -> generate_pb2.ChatMessages:
    return generate_pb2.ChatMessages(messages=[generate_pb2.ChatMessage(role=r, content=c)
                                               for r, c in messages])


def _text_field(raw: bytes) -> bytes:
    """A GenerateRequest whose `text` (field 1, a string) holds raw bytes."""
    assert len(raw) < 128
    return bytes([0x0A, len(raw)]) + raw + request(max_tokens=4)


GRPC_CASES = {
    "prompt over the character limit": (
        request(text="ab" * (MAX_CHARS // 2 + 1)), grpc.StatusCode.INVALID_ARGUMENT,
        f"prompt has {MAX_CHARS + 2} characters; at most {MAX_CHARS}"),
    "message over the byte limit": (
        request(text="a" * (request_bytes(prompt_chars(BYTES_LIMIT_CONTEXT_TOKENS)) + 1)),
        grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    "too many stop strings": (
        request(text="Hi", stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]),
        grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_STOP_STRINGS} stop strings"),
    "a stop string too long": (
        request(text="Hi", stop=["x" * (MAX_STOP_STRING_CHARS + 1)]),
        grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_STOP_STRING_CHARS} characters"),
    "unknown chat role": (
        request(messages=chat([("wizard", "Hi")])), grpc.StatusCode.INVALID_ARGUMENT,
        "'wizard'"),
    "too many messages": (
        request(messages=chat([("user", "Hi")] * (MAX_CHAT_MESSAGES + 1))),
        grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_CHAT_MESSAGES} messages"),
    "messages over the character limit": (
        request(messages=chat([("user", "ab" * (MAX_CHARS // 4))] * 3)),
        grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_CHARS} are accepted"),
    "invalid UTF-8 in a string field": (
        _text_field(b"Hi \xff\xfe"), grpc.StatusCode.INVALID_ARGUMENT, "UTF-8"),
    "corrupt protobuf": (
        b"\xff\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "malformed request"),
}


@pytest.mark.parametrize("case", list(GRPC_CASES))
def test_generate_refuses_bad_input(scheduler, case):
    payload, code, fragment = GRPC_CASES[case]
    got, details, out = generate(scheduler, payload)
    assert (got, out) == (code, []), details
    assert fragment in details
    _clean(details)
    ok, _, chunks = generate(scheduler, request(text="The capital of France is"))
    assert ok == grpc.StatusCode.OK and chunks[-1].finish_reason


# -- gRPC: the tokenizer, called directly -----------------------------------------------------
def tokenizer_call(ch, stack, method: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    call = ch.unary_unary(f"/shardline.v1.Tokenizer/{method}")
    try:
        call(payload, timeout=TIMEOUT_S, metadata=_token(stack))
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _chat_request(messages) -> bytes:
    return tokenizer_pb2.ChatTemplateRequest(
        messages=chat(messages).messages, add_generation_prompt=True).SerializeToString()


TOKENIZER_CASES = {
    "texts over the character limit": (
        "Tokenize", tokenizer_pb2.TokenizeRequest(texts=["ab" * (MAX_CHARS // 2), "abc"])
        .SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT,
        f"texts have {MAX_CHARS + 3} characters; at most {MAX_CHARS}"),
    "message over the byte limit": (
        "Tokenize", tokenizer_pb2.TokenizeRequest(texts=["a" * request_bytes(MAX_CHARS)])
        .SerializeToString(), grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"vs. {request_bytes(MAX_CHARS)})"),
    "unknown chat role": (
        "ApplyChatTemplate", _chat_request([("wizard", "Hi")]),
        grpc.StatusCode.INVALID_ARGUMENT, "'wizard'"),
    "too many messages": (
        "ApplyChatTemplate", _chat_request([("user", "Hi")] * (MAX_CHAT_MESSAGES + 1)),
        grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_CHAT_MESSAGES} messages"),
    "invalid UTF-8 in a string field": (
        "Tokenize", b"\x0a\x03a\xff\xfe", grpc.StatusCode.INVALID_ARGUMENT, "UTF-8"),
    "corrupt protobuf": (
        "Detokenize", b"\xff\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT,
        "malformed request"),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_tokenizer_refuses_bad_input(tokenizer, stack, case):
    method, payload, code, fragment = TOKENIZER_CASES[case]
    got, details = tokenizer_call(tokenizer, stack, method, payload)
    assert got == code, details
    assert fragment in details
    _clean(details)
    ok = tokenizer_pb2.TokenizeRequest(texts=["Hello"]).SerializeToString()
    assert tokenizer_call(tokenizer, stack, "Tokenize", ok) == (grpc.StatusCode.OK, "")


def test_tokenizer_stream_refuses_a_corrupt_message(tokenizer, stack):
    call = tokenizer.stream_stream("/shardline.v1.Tokenizer/DetokenizeStream")
    good = tokenizer_pb2.DetokenizeRequest(items=[tokenizer_pb2.DetokenizeItem(token_ids=[1])])
    responses = call(iter([good.SerializeToString(), b"\xff\xff\xff"]), timeout=TIMEOUT_S,
                     metadata=_token(stack))
    with pytest.raises(grpc.RpcError) as e:
        list(responses)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in e.value.details()


# -- HTTP: the OpenAI API ----------------------------------------------------------------------
def post(stack, path: str, body) -> tuple[int, dict]:
    """(status, parsed JSON) of one POST; body is bytes as sent, or an object to encode."""
    u = urllib.parse.urlparse(stack.stack.http_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT_S)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    status, raw = resp.status, resp.read()
    conn.close()
    return status, json.loads(raw)


def _completion(**kw) -> dict:
    return {"model": DEFAULT_MODEL, "max_tokens": 4, **kw}


def _chat(messages, **kw) -> dict:
    return {"model": DEFAULT_MODEL, "max_tokens": 4, "messages": messages, **kw}


HTTP_CASES = {
    "prompt over the character limit": (
        "/v1/completions", _completion(prompt="ab" * (MAX_CHARS // 2 + 1)), 400,
        f"at most {MAX_CHARS}"),
    "body over the byte limit": (
        "/v1/completions",
        _completion(prompt="a" * request_bytes(prompt_chars(BYTES_LIMIT_CONTEXT_TOKENS))), 413,
        "larger than"),
    "too many stop strings": (
        "/v1/completions", _completion(prompt="Hi", stop=[f"s{i}" for i in range(17)]), 400,
        f"at most {MAX_STOP_STRINGS} stop strings"),
    "a stop string too long": (
        "/v1/completions", _completion(prompt="Hi", stop="x" * (MAX_STOP_STRING_CHARS + 1)),
        400, f"at most {MAX_STOP_STRING_CHARS} characters"),
    "unknown chat role": (
        "/v1/chat/completions", _chat([{"role": "wizard", "content": "Hi"}]), 400, "'wizard'"),
    "too many messages": (
        "/v1/chat/completions", _chat([{"role": "user", "content": "Hi"}] *
                                      (MAX_CHAT_MESSAGES + 1)), 400,
        f"at most {MAX_CHAT_MESSAGES} messages"),
    "invalid UTF-8 in the body": (
        "/v1/completions", b'{"model": "%s", "prompt": "Hi \xff\xfe", "max_tokens": 4}'
        % DEFAULT_MODEL.encode(), 400, ""),
    "a lone surrogate in the body": (
        "/v1/chat/completions", b'{"model": "%s", "max_tokens": 4, "messages": '
        b'[{"role": "user", "content": "Hi \\ud800"}]}' % DEFAULT_MODEL.encode(), 400, ""),
    "not JSON": ("/v1/completions", b"{not json", 400, ""),
}


@pytest.mark.parametrize("case", list(HTTP_CASES))
def test_http_refuses_bad_input(stack, case):
    path, body, status, fragment = HTTP_CASES[case]
    got, out = post(stack, path, body)
    message = out["error"]["message"]
    assert (got, out["error"]["code"]) == (status, status), message
    assert fragment in message
    _clean(message)
    got, out = post(stack, "/v1/completions", _completion(prompt="The capital of France is"))
    assert got == 200 and out["choices"][0]["finish_reason"], out


# -- logs --------------------------------------------------------------------------------------
def _wait_for_line(stack, child: str, fragment: str) -> str:
    """The first line of child's recent output holding fragment (polled: another thread reads
    its output)."""
    tail = stack.stack.child(child).tail
    return wait_for(lambda: next((line for line in list(tail) if fragment in line), None),
                    60.0, f"a line with {fragment!r} from {child}")


def test_a_refusal_is_one_warning_line_without_traceback(stack, scheduler):
    for i, payload in enumerate([
            request(text="Hi", stop=["x"] * (MAX_STOP_STRINGS + 1)),
            request(messages=chat([("wizard", "Hi")]))]):
        rid = f"bad-input-{i}"
        req = generate_pb2.GenerateRequest.FromString(payload)
        req.request_id = rid
        code, _, _ = generate(scheduler, req.SerializeToString())
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        line = _wait_for_line(stack, "scheduler", f"request_id={rid}")
        assert " WARNING " in line and "refused" in line, line
    for child in ("scheduler", "tokenizer"):
        tail = "".join(stack.stack.child(child).tail)
        assert "Traceback" not in tail and " ERROR " not in tail, tail


# -- memory ------------------------------------------------------------------------------------
def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.parametrize("child, method, limit", [
    ("tokenizer", "/shardline.v1.Tokenizer/Tokenize", request_bytes(MAX_CHARS)),
    ("worker-0", "/shardline.v1.StageWorker/GetInfo",
     step_message_bytes(8192, MODEL_HIDDEN, MODEL_CONTEXT)),
])
def test_oversized_messages_are_refused_unread(stack, scheduler, child, method, limit):
    """Eight messages of 512 MiB, each refused from its length prefix: the receiver's memory
    grows by less than holding one of them would take (what it reads of each before the
    refusal lands is freed; a worker keeps freed heap memory for reuse, worker/heap.py)."""
    big = b"\x0a" + bytes(OVERSIZED_BYTES)    # never parsed: refused by its size alone
    assert len(big) > limit
    pid = stack.stack.child(child).proc.pid
    before = _rss(pid)
    with grpc.insecure_channel(_address_of(stack, child),
                               options=[("grpc.max_send_message_length", -1)]) as ch:
        call = ch.unary_unary(method)
        for _ in range(8):
            with pytest.raises(grpc.RpcError) as e:
                call(big, timeout=TIMEOUT_S, metadata=_token(stack))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"vs. {limit})" in e.value.details()
    assert _rss(pid) - before < OVERSIZED_BYTES
    ok, _, chunks = generate(scheduler, request(text="The capital of France is"))
    assert ok == grpc.StatusCode.OK and chunks[-1].finish_reason
