"""Worker discovery: StaticDiscovery, and KubernetesDiscovery's list/watch logic.

No Kubernetes API server can run where these tests run, so KubernetesDiscovery is tested on
RECORDED-STYLE pod watch streams: tests/fixtures/k8s/*.json, synthetic streams modelled on real
`kubectl get pods -w -o json` / watch API output for the chart's worker StatefulSets (see
make_fixtures.py there). FakeCoreV1Api serves them in place of CoreV1Api.list_namespaced_pod,
and the REAL kubernetes.watch.Watch reads them, so event decoding, the 410 Gone ERROR event and
resourceVersion handling go through the client library's own code.
"""
from __future__ import annotations

import asyncio
import json
import pathlib
import threading
from types import SimpleNamespace

import pytest
from urllib3.exceptions import ProtocolError

from shardline.scheduler.discovery import (KubernetesDiscovery, PipelineDown, PipelineUp,
                                           PodTracker, StaticDiscovery)

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "k8s"
SELECTOR = "app.kubernetes.io/component=worker"
PORT = 50061


def load(name: str) -> list[dict]:
    return json.loads((FIXTURES / f"{name}.json").read_text())["calls"]


def summary(ev) -> tuple:
    if isinstance(ev, PipelineUp):
        return ("up", ev.replica_id, tuple(ev.addresses))
    assert isinstance(ev, PipelineDown) and ev.reason
    return ("drain" if ev.drain else "down", ev.replica_id)


def addrs(*ips: str) -> tuple:
    return tuple(f"{ip}:{PORT}" for ip in ips)


class FakeWatchResponse:
    """The urllib3 response of a watch request: one JSON event per line. The last response
    of a script stays open (an idle watch) until Watch.stop() shuts its socket down."""

    def __init__(self, events: list[dict], hold_open: bool):
        self.status = 200
        self._lines = [json.dumps(e).encode() + b"\n" for e in events]
        self._hold_open = hold_open
        self._closed = threading.Event()
        self.drained = threading.Event()
        self.connection = SimpleNamespace(sock=SimpleNamespace(shutdown=lambda how: self._closed.set()))

    def stream(self, amt=None, decode_content=False):
        yield from self._lines
        self.drained.set()          # the reader has taken every event and asks for more
        if self._hold_open:
            self._closed.wait(10)

    def close(self):
        self._closed.set()

    def release_conn(self):
        pass


class FakeCoreV1Api:
    """Plays a script of API calls: {"list": PodList} | {"watch": [events]} | {"fail": ...}."""

    def __init__(self, calls: list[dict]):
        self.calls = list(calls)
        self.requests: list[tuple] = []
        self.last: FakeWatchResponse | None = None

    def list_namespaced_pod(self, namespace, label_selector=None, resource_version=None,
                            watch=False, _preload_content=True, **kw):
        assert namespace == "llm" and label_selector == SELECTOR and not _preload_content
        self.requests.append(("watch" if watch else "list", resource_version))
        call = self.calls.pop(0) if self.calls else {"watch": []}
        if "fail" in call:
            raise ProtocolError("Connection broken: ConnectionResetError(104)")
        if "list" in call:
            assert not watch, f"expected a list, got a watch: {self.requests}"
            return SimpleNamespace(status=200, data=json.dumps(call["list"]).encode())
        assert watch, f"expected a watch, got a list: {self.requests}"
        assert kw["timeout_seconds"] > 0 and kw["allow_watch_bookmarks"]
        self.last = FakeWatchResponse(call["watch"], hold_open=not self.calls)
        return self.last


def run_discovery(calls: list[dict]) -> tuple[list, FakeCoreV1Api]:
    """Feed a script through KubernetesDiscovery; every event it emitted, and the fake API."""
    api = FakeCoreV1Api(calls)

    async def body():
        d = KubernetesDiscovery("llm", SELECTOR, PORT, api=api)
        await d.start()

        def played_all():
            while api.calls or api.last is None or not api.last.drained.wait(0.01):
                pass
        # The watch thread posts each event (call_soon_threadsafe) before it asks for the next
        # line, so every event is queued on the loop ahead of played_all's own completion.
        await asyncio.wait_for(asyncio.to_thread(played_all), 30)   # a guard, not a timing
        await d.close()
        return [e async for e in d]
    return asyncio.run(body()), api


def replay(calls: list[dict]) -> list[list[tuple]]:
    """Through a bare PodTracker: the events caused by each listing / watch event, in order."""
    t = PodTracker(PORT)
    steps = []
    for call in calls:
        if "list" in call:
            steps.append([summary(e) for e in t.reset(call["list"]["items"])])
        for ev in call.get("watch", []):
            if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                steps.append([summary(e) for e in t.apply(ev["type"], ev["object"])])
    return steps


R0 = addrs("10.244.1.10", "10.244.2.10")
R1 = addrs("10.244.1.11", "10.244.2.11")


def test_static_discovery_ups_every_pipeline_then_ends_on_close():
    async def body():
        d = StaticDiscovery([["a:1", "b:2"], ["c:3"]])
        await d.start()
        await d.close()
        return [e async for e in d]
    assert asyncio.run(body()) == [PipelineUp("0", ["a:1", "b:2"]), PipelineUp("1", ["c:3"])]
    with pytest.raises(ValueError):
        StaticDiscovery([])
    with pytest.raises(ValueError):
        StaticDiscovery([["a:1"], []])


def test_scale_up_replica_is_up_only_when_all_stages_ready():
    calls = load("scale_up")
    events, api = run_discovery(calls)
    assert [summary(e) for e in events] == [("up", "0", R0), ("up", "1", R1)]
    assert api.requests == [("list", None), ("watch", calls[0]["list"]["metadata"]["resourceVersion"])]
    steps = replay(calls)
    # 1 listing + 10 pod events (5 per new pod); replica 1 comes up at the very last one,
    # when stage 1 turns Ready, not when stage 0 did (step 5) or stage 1 got its IP.
    assert len(steps) == 11
    assert steps[0] == [("up", "0", R0)]
    assert steps[-1] == [("up", "1", R1)]
    assert all(s == [] for s in steps[1:-1])


def test_scale_down_drains_then_goes_down():
    calls = load("scale_down")
    events, _ = run_discovery(calls)
    assert [summary(e) for e in events] == [
        ("up", "0", R0), ("up", "1", R1), ("drain", "1"), ("down", "1")]
    steps = replay(calls)
    # Events: stage 1 deletionTimestamp, stage 0 deletionTimestamp, stage 1 NotReady,
    # terminated, DELETED, then the same for stage 0.
    assert steps[1] == [("drain", "1")]       # first deletionTimestamp: stop sending new work
    assert steps[2:5] == [[], [], []]         # still draining while the pod lingers
    assert steps[5] == [("down", "1")]        # stage 1's pod is gone
    assert steps[6:] == [[], [], []]


def test_pod_restart_with_new_ip_and_in_place_container_restart():
    events, _ = run_discovery(load("pod_restart"))
    assert [summary(e) for e in events] == [
        ("up", "0", R0), ("up", "1", R1),
        ("drain", "0"), ("down", "0"),                          # stage 1 pod deleted
        ("up", "0", addrs("10.244.1.10", "10.244.2.60")),        # recreated with a new IP
        ("down", "1"), ("up", "1", R1),                          # NotReady, then Ready again
    ]


def test_410_gone_relists_and_reconciles_what_was_missed():
    calls = load("gone_410")
    events, api = run_discovery(calls)
    assert [summary(e) for e in events] == [
        ("up", "0", R0), ("up", "1", R1),
        ("down", "1"), ("up", "1", R1),                           # watch 1: crash + ready
        # re-list after 410: replica 0 vanished, replica 1's stage 1 has a new IP, replica 2 new
        ("down", "0"),
        ("down", "1"), ("up", "1", addrs("10.244.1.11", "10.244.2.61")),
        ("up", "2", addrs("10.244.1.12", "10.244.2.12")),
        ("down", "2"),                                            # watch 3: a crash
    ]
    rv_list1 = calls[0]["list"]["metadata"]["resourceVersion"]
    rv_bookmark = calls[1]["watch"][-1]["object"]["metadata"]["resourceVersion"]
    rv_list2 = calls[3]["list"]["metadata"]["resourceVersion"]
    assert api.requests == [("list", None), ("watch", rv_list1), ("watch", rv_bookmark),
                            ("list", None), ("watch", rv_list2)]


def test_partial_replicas_never_come_up():
    calls = load("partial")
    events, _ = run_discovery(calls)
    three = addrs("10.244.1.10", "10.244.2.10", "10.244.3.10")
    assert [summary(e) for e in events] == [("up", "0", three)]


def test_connection_errors_retry_the_watch_from_the_same_version():
    calls = load("scale_up")
    events, api = run_discovery([calls[0], {"fail": True}, calls[1]])
    assert [summary(e) for e in events] == [("up", "0", R0), ("up", "1", R1)]
    rv = calls[0]["list"]["metadata"]["resourceVersion"]
    assert api.requests == [("list", None), ("watch", rv), ("watch", rv)]


def test_stage_count_from_config_and_ordinal_from_the_pod_name():
    calls = load("scale_up")
    pods = calls[0]["list"]["items"]
    for p in pods:
        del p["metadata"]["labels"]["apps.kubernetes.io/pod-index"]   # older clusters
    stray = json.loads(json.dumps(pods[0]))
    stray["metadata"].update(uid="other", name="shardline-tokenizer-abc12")
    del stray["metadata"]["labels"]["shardline.io/stage"]
    t = PodTracker(PORT)
    assert [summary(e) for e in t.reset(pods + [stray])] == [("up", "0", R0)]
    # Without the num-stages label, the configured stage count decides.
    for p in pods:
        del p["metadata"]["labels"]["shardline.io/num-stages"]
    assert PodTracker(PORT).reset(pods) == []
    assert [summary(e) for e in PodTracker(PORT, num_stages=2).reset(pods)] == [("up", "0", R0)]
    assert PodTracker(PORT, num_stages=3).reset(pods) == []
