"""The tokenizer service as its own process, over real gRPC on localhost."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shardline.v1 import generate_pb2, tokenizer_pb2, tokenizer_pb2_grpc

pytestmark = pytest.mark.slow

SERVICES_DIR = Path(__file__).resolve().parents[2] / "services"
TEXT = "Héllo 世界 🦄👍🏽  naïve café"


from shardline.launcher import free_port  # noqa: E402  (outside the ephemeral port range)


def wait_serving(address: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"tokenizer exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service="shardline.v1.Tokenizer"),
                                    timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"tokenizer not SERVING on {address} after {timeout_s}s")


@pytest.fixture(scope="module")
def server(model_dir):                             # model_dir: conftest.py, resolve_model(DEFAULT_MODEL)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(SERVICES_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardline.tokenizer.server", "--model", model_dir,
         "--port", str(port), "--host", "127.0.0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, proc)
        yield proc, address
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def stub(server):
    _, address = server
    with grpc.insecure_channel(address) as ch:
        yield tokenizer_pb2_grpc.TokenizerStub(ch)


def test_get_info(stub, model_dir):
    info = stub.GetInfo(tokenizer_pb2.TokenizerInfoRequest(), timeout=10)
    assert info.vocab_size == 49152
    assert 2 in info.eos_token_ids                      # <|im_end|>
    assert info.has_chat_template and info.name == model_dir


def test_tokenize_and_detokenize_roundtrip(stub):
    resp = stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=[TEXT, "", "hi"]), timeout=10)
    assert len(resp.results) == 3 and list(resp.results[1].ids) == []
    ids = list(resp.results[0].ids)

    prefix = read = 0
    out = []
    for end in range(1, len(ids) + 1):                  # one new token per step, as the scheduler does
        item = tokenizer_pb2.DetokenizeItem(token_ids=ids[prefix:end], read_offset=read - prefix,
                                            skip_special_tokens=True)
        other = tokenizer_pb2.DetokenizeItem(token_ids=list(resp.results[2].ids))   # batched along
        r, r2 = stub.Detokenize(tokenizer_pb2.DetokenizeRequest(items=[item, other]), timeout=10).results
        assert r2.text == "hi"
        out.append(r.text)
        prefix, read = prefix + r.prefix_advance, prefix + r.read_offset
    assert "".join(out) == TEXT


def test_detokenize_runs_beside_tokenize_calls(stub):
    """Tokenize calls (worker thread) and Detokenize calls (event loop, or a second thread past
    4096 ids) at the same time: each has its own backend, so none fails with "Already
    borrowed" and every result is right."""
    long_text = TEXT * 200
    ids = list(stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=[TEXT]), timeout=10).results[0].ids)
    big = ids * 400                                       # > 4096 ids: the threaded path
    futures = []
    for _ in range(20):
        futures.append(("tok", stub.Tokenize.future(
            tokenizer_pb2.TokenizeRequest(texts=[long_text] * 4), timeout=60)))
        futures.append(("small", stub.Detokenize.future(tokenizer_pb2.DetokenizeRequest(
            items=[tokenizer_pb2.DetokenizeItem(token_ids=ids)] * 16), timeout=60)))
        futures.append(("big", stub.Detokenize.future(tokenizer_pb2.DetokenizeRequest(
            items=[tokenizer_pb2.DetokenizeItem(token_ids=big)]), timeout=60)))
    for kind, f in futures:
        res = f.result()
        if kind == "small":
            assert [r.text for r in res.results] == [TEXT] * 16
        elif kind == "big":
            assert res.results[0].text == TEXT * 400
        else:
            assert len(res.results) == 4 and len(res.results[0].ids) >= 200 * len(ids) - 200


def test_apply_chat_template(stub):
    req = tokenizer_pb2.ChatTemplateRequest(
        messages=[generate_pb2.ChatMessage(role="user", content="Hi")], add_generation_prompt=True)
    resp = stub.ApplyChatTemplate(req, timeout=10)
    assert resp.rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert len(resp.results) == 1
    again = stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=[resp.rendered]), timeout=10)
    assert list(resp.results[0].ids) == list(again.results[0].ids)


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ([generate_pb2.ChatMessage(role="wizard", content="x")], "wizard"),
])
def test_bad_chat_input_is_invalid_argument(stub, messages, match):
    with pytest.raises(grpc.RpcError) as err:
        stub.ApplyChatTemplate(tokenizer_pb2.ChatTemplateRequest(messages=messages), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in err.value.details()


def test_detokenize_stream_answers_each_request_in_order(stub):
    ids = list(stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=[TEXT]), timeout=10).results[0].ids)
    reqs = [tokenizer_pb2.DetokenizeRequest(items=[tokenizer_pb2.DetokenizeItem(token_ids=ids[:n])])
            for n in (1, 2, len(ids))]
    texts = [r.results[0].text for r in stub.DetokenizeStream(iter(reqs), timeout=10)]
    assert texts == [stub.Detokenize(q, timeout=10).results[0].text for q in reqs]
    assert texts[-1] == TEXT
    bad = tokenizer_pb2.DetokenizeRequest(items=[tokenizer_pb2.DetokenizeItem(token_ids=[1],
                                                                              read_offset=5)])
    with pytest.raises(grpc.RpcError) as e:
        list(stub.DetokenizeStream(iter([reqs[0], bad]), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "read_offset" in e.value.details()


def test_bad_detokenize_offsets_are_invalid_argument(stub):
    item = tokenizer_pb2.DetokenizeItem(token_ids=[1, 2], read_offset=5)
    with pytest.raises(grpc.RpcError) as err:
        stub.Detokenize(tokenizer_pb2.DetokenizeRequest(items=[item]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_reflection_lists_the_service(server):
    _, address = server
    with grpc.insecure_channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"shardline.v1.Tokenizer", "grpc.health.v1.Health"} <= names


def test_sigterm_exits_cleanly(server):              # last: stops the module's server
    proc, _ = server
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("tokenizer did not stop within 10s of SIGTERM")
    out = proc.stdout.read()
    assert code == 0, out
    assert "stopped" in out
