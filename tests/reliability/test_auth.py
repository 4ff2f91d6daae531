"""Who may call what (common/auth.py): internal services refuse strangers, a stage serves one
scheduler's step stream and forwards only to its configured next stages, the public API
wants its keys, mTLS refuses peers without a certificate. Real processes over loopback."""
from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardline.client import Client
from shardline.common.auth import TOKEN_ENV, ApiKeys
from shardline.common.spawn import spawn_shardline
from shardline.launcher import free_port, wait_serving
from shardline.protocol.decode_rows import decode_result
from shardline.protocol.route import ROUTE_KEY, SESSION_KEY
from shardline.v1 import (common_pb2, generate_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc,
                          worker_pb2, worker_pb2_grpc)
from tests.reliability.conftest import RunningStack

pytestmark = pytest.mark.slow

KEYS = "# public API keys\nsk-team-a team-a\nsk-anyone\n"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def port_of(argv: list[str]) -> int:
    return int(argv[argv.index("--port") + 1])


@pytest.fixture(scope="module")
def stack(model_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(KEYS)
    with RunningStack(model_dir, stages=2, http=True,
                      extra_scheduler=["--api-keys-file", str(keys)]) as s:
        yield s


def internal_addresses(s: RunningStack) -> dict[str, str]:
    """child name -> address of the tokenizer and the workers."""
    return {c.name: f"127.0.0.1:{port_of(c.argv)}" for c in s.stack.children
            if c.name != "scheduler"}


def test_internal_services_refuse_calls_without_the_cluster_token(stack):
    token = stack.stack.cluster_token
    assert token
    for name, address in internal_addresses(stack).items():
        with grpc.insecure_channel(address) as ch:
            if name == "tokenizer":
                stub = tokenizer_pb2_grpc.TokenizerStub(ch)
                call, req = stub.Tokenize, tokenizer_pb2.TokenizeRequest(texts=["hello"])
            else:
                stub = worker_pb2_grpc.StageWorkerStub(ch)
                call, req = stub.GetInfo, worker_pb2.StageInfoRequest()
            for metadata in ((), bearer("not-the-token"), (("authorization", token),)):
                with pytest.raises(grpc.RpcError) as err:
                    call(req, metadata=metadata, timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
                assert "cluster token" in err.value.details()
            assert call(req, metadata=bearer(token), timeout=30)        # the peers' way in
            # health is exempt (kubelet's gRPC probes send no metadata)
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING


class Feed:
    """The request side of a synchronous stream: put() messages, close() ends it."""

    def __init__(self):
        self._q: queue.Queue = queue.Queue()

    def put(self, msg) -> None:
        self._q.put(msg)

    def close(self) -> None:
        self._q.put(None)

    def __iter__(self):
        while (msg := self._q.get()) is not None:
            yield msg


def open_step(address: str, token: str, session: str = "", route: str = ""):
    """(channel, Feed, response iterator) of a Step stream."""
    ch = grpc.insecure_channel(address)
    feed = Feed()
    md = list(bearer(token))
    if session:
        md.append((SESSION_KEY, session))
    if route:
        md.append((ROUTE_KEY, route))
    return ch, feed, worker_pb2_grpc.StageWorkerStub(ch).Step(iter(feed), metadata=md,
                                                              timeout=60)


def step_error(address: str, token: str, session: str = "", route: str = "",
               request: worker_pb2.StepRequest | None = None) -> grpc.RpcError:
    ch, feed, responses = open_step(address, token, session, route)
    try:
        if request is not None:
            feed.put(request)
        with pytest.raises(grpc.RpcError) as err:
            next(responses)
        return err.value
    finally:
        feed.close()
        ch.close()


def test_a_stage_serves_one_scheduler_and_forwards_only_to_its_next_stage(stack):
    token = stack.stack.cluster_token
    addrs = internal_addresses(stack)
    stage0, stage1 = addrs["worker-0"], addrs["worker-1"]
    with Client(stack.address, api_key="sk-anyone") as c:
        before = c.generate("The capital of France is", max_tokens=8).text

    err = step_error(stage0, token, session="intruder")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and ROUTE_KEY in err.details()
    err = step_error(stage0, token)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and SESSION_KEY in err.details()
    # a route from metadata alone: refused, nothing dialled
    err = step_error(stage0, token, session="intruder", route="127.0.0.1:47999")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--next-stage" in err.details()
    # the right route, but both stages already serve the scheduler's stream
    for address, route in ((stage0, stage1), (stage1, "")):
        err = step_error(address, token, session="intruder", route=route,
                         request=worker_pb2.StepRequest(step_id=1))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, address
        assert "another scheduler" in err.details()

    with Client(stack.address, api_key="sk-anyone") as c:      # the replica is unharmed
        assert c.generate("The capital of France is", max_tokens=8).text == before
        (replica,) = c.stats().replicas
        assert replica.healthy


def test_public_api_keys_on_grpc_and_http(stack):
    for key in (None, "sk-wrong"):
        with Client(stack.address, api_key=key or "") as c:
            with pytest.raises(grpc.RpcError) as err:
                c.generate("Hello", max_tokens=2)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "API key" in err.value.details()
    with Client(stack.address, api_key="sk-team-a") as c:
        assert c.generate("Hello", max_tokens=2).usage.completion_tokens == 2

    url = stack.stack.http_url
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        req = urllib.request.Request(f"{url}/v1/models", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 401
        body = json.loads(err.value.read())
        assert body["error"]["code"] == "invalid_api_key"
    req = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": "Bearer sk-anyone"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert json.loads(r.read())["data"][0]["id"]
    with urllib.request.urlopen(f"{url}/health", timeout=30) as r:       # probes need no key
        assert r.status == 200


def test_profile_wants_an_api_key_and_the_stages_the_cluster_token(stack):
    """Generation.Profile is behind the API keys as Generate is; a stage's Profile behind the
    cluster token. A known key gets as far as the request's checks (steps 0)."""
    bad = common_pb2.ProfileRequest(steps=0)
    with grpc.insecure_channel(stack.address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        for metadata in ((), bearer("sk-wrong")):
            with pytest.raises(grpc.RpcError) as err:
                stub.Profile(common_pb2.ProfileRequest(steps=1, timeout_s=1), metadata=metadata,
                             timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.Profile(bad, metadata=bearer("sk-anyone"), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    token = stack.stack.cluster_token
    for name, address in internal_addresses(stack).items():
        if name == "tokenizer":
            continue
        with grpc.insecure_channel(address) as ch:
            stub = worker_pb2_grpc.StageWorkerStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Profile(common_pb2.ProfileRequest(steps=1, timeout_s=1), timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            with pytest.raises(grpc.RpcError) as err:
                stub.Profile(bad, metadata=bearer(token), timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name


def test_bench_presents_the_api_key_on_both_apis(stack):
    """`shardline bench --http URL --both` with $SHARDLINE_API_KEY measures both front doors;
    without it the first call is refused."""
    argv = [sys.executable, "-m", "shardline", "bench", "--address", stack.address,
            "--http", stack.stack.http_url, "--both", "--requests", "1", "--warmup", "0",
            "--prompt-tokens", "4", "--max-tokens", "2"]
    env = {k: v for k, v in os.environ.items() if k != "SHARDLINE_API_KEY"}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                         env={**env, "SHARDLINE_API_KEY": "sk-anyone"})
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["shardline"]["output_tokens"] == res["shardline_http"]["output_tokens"] == 2
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0 and "UNAUTHENTICATED" in out.stderr, out.stderr


def test_api_keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(KEYS)
    keys = ApiKeys.load(str(path))
    assert keys.check("sk-team-a") and keys.check("sk-anyone")
    assert not keys.check("sk-team") and not keys.check(None) and not keys.check("")
    assert keys.tenant("sk-team-a") == "team-a" and keys.tenant("sk-anyone") is None
    path.write_text("a b c\n")
    with pytest.raises(ValueError):
        ApiKeys.load(str(path))
    path.write_text("# nothing\n")
    with pytest.raises(ValueError):
        ApiKeys.load(str(path))


WORKER_TOKEN = "worker-test-token"


@pytest.fixture(scope="module")
def lone_worker(model_dir, tmp_path_factory):
    """One single-stage worker, no scheduler: the test is its only caller."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("worker") / "log", "w+")
    proc = spawn_shardline(["worker", "--model", model_dir, "--port", str(port), "--host",
                            "127.0.0.1", "--kv-cache-memory", "16MiB", "--threads", "1"],
                           stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, TOKEN_ENV: WORKER_TOKEN})
    address = f"127.0.0.1:{port}"
    try:
        if not wait_serving(address, 180, alive=lambda: proc.poll() is None):
            log.seek(0)
            raise RuntimeError(f"worker did not start:\n{log.read()[-4000:]}")
        yield address
    finally:
        proc.kill()
        proc.wait()
        log.close()


def admit(seq_id: int, **sampling) -> worker_pb2.StepRequest:
    return worker_pb2.StepRequest(step_id=seq_id, seqs=[worker_pb2.SeqPlan(
        seq_id=seq_id, token_ids=[1, 2, 3], start_pos=0, new_block_ids=[0], sample=True,
        admit=True, sampling=common_pb2.SamplingParams(**sampling))])


def test_the_same_scheduler_supersedes_its_stream_and_others_are_refused(lone_worker):
    ch, feed, old = open_step(lone_worker, WORKER_TOKEN, session="scheduler-a")
    try:
        feed.put(admit(7))
        assert len(decode_result(next(old))) == 1
        err = step_error(lone_worker, WORKER_TOKEN, session="scheduler-b",
                         request=admit(8))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        # scheduler-a reconnects: its old stream ends, and the sequences it held are gone
        ch2, feed2, new = open_step(lone_worker, WORKER_TOKEN, session="scheduler-a")
        try:
            with pytest.raises(grpc.RpcError) as err:
                next(old)
            assert err.value.code() == grpc.StatusCode.ABORTED
            feed2.put(worker_pb2.StepRequest(step_id=2, seqs=[worker_pb2.SeqPlan(
                seq_id=7, token_ids=[4], start_pos=3, sample=True)]))
            with pytest.raises(grpc.RpcError) as err:
                next(new)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unknown to this stage" in err.value.details()
        finally:
            feed2.close()
            ch2.close()
    finally:
        feed.close()
        ch.close()
    # with the stream gone, scheduler-b may start one
    ch3, feed3, third = open_step(lone_worker, WORKER_TOKEN, session="scheduler-b")
    try:
        feed3.put(admit(9))
        assert len(decode_result(next(third))) == 1
    finally:
        feed3.close()
        ch3.close()


@pytest.mark.parametrize("sampling, word", [
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(logprobs=True, top_logprobs=10_000), "top_logprobs"),
])
def test_the_worker_checks_sampling_parameters(lone_worker, sampling, word):
    err = step_error(lone_worker, WORKER_TOKEN, session=f"s-{word}", request=admit(11, **sampling))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert word in err.details()


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA and two certificates it signs, for the name `shardline-internal`."""
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=shardline-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:shardline-internal\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", "/CN=shardline-internal", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext",
                 cwd=d)
    return d


def test_mtls_refuses_peers_without_a_certificate(model_dir, certs):
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = spawn_shardline(["tokenizer", "--model", model_dir, "--port", str(port), "--host",
                            "127.0.0.1", "--tls-cert", str(certs / "server.pem"), "--tls-key",
                            str(certs / "server.key"), "--tls-ca", str(certs / "ca.pem")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ca = (certs / "ca.pem").read_bytes()
    name = [("grpc.ssl_target_name_override", "shardline-internal")]
    req = tokenizer_pb2.TokenizeRequest(texts=["hello"])
    try:
        good = grpc.ssl_channel_credentials(ca, (certs / "client.key").read_bytes(),
                                            (certs / "client.pem").read_bytes())
        with grpc.secure_channel(address, good, options=name) as ch:
            stub = tokenizer_pb2_grpc.TokenizerStub(ch)
            res = stub.Tokenize(req, timeout=120, wait_for_ready=True)
            assert list(res.results[0].ids)
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca), options=name) as ch:
            with pytest.raises(grpc.RpcError) as err:          # no client certificate
                tokenizer_pb2_grpc.TokenizerStub(ch).Tokenize(req, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(address) as ch:              # plaintext
            with pytest.raises(grpc.RpcError) as err:
                tokenizer_pb2_grpc.TokenizerStub(ch).Tokenize(req, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.kill()
        proc.wait()
