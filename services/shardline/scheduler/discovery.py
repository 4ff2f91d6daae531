"""Worker discovery: which pipeline replicas exist and where their stages listen.

A pipeline replica is a stage-ordered list of worker addresses. Discovery tells the scheduler
about replicas as events, read with `async for event in discovery`:

    PipelineUp(replica_id, addresses)     every stage can take work, stage 0 first
    PipelineDown(replica_id, reason, drain)
        drain=True:  a stage is shutting down gracefully: send no new requests, let the
                     running ones finish
        drain=False: a stage is gone or not ready: re-queue the replica's sequences elsewhere

A replica that was Down comes back with a new PipelineUp; one whose addresses change gets
PipelineDown then PipelineUp. StaticDiscovery serves fixed addresses (flags, `shardline up`);
KubernetesDiscovery watches the worker pods of the Helm chart.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from dataclasses import dataclass
from typing import Optional, Union

log = logging.getLogger(__name__)


@dataclass
class PipelineUp:
    replica_id: str
    addresses: list[str]


@dataclass
class PipelineDown:
    replica_id: str
    reason: str
    drain: bool = False


DiscoveryEvent = Union[PipelineUp, PipelineDown]
_CLOSED = object()


class Discovery:
    """Base of the discoveries: start(), then `async for event in discovery`, then close()."""

    def __init__(self):
        self._events: asyncio.Queue = asyncio.Queue()

    async def start(self) -> None:
        """Begin discovering; events queue up until they are read."""

    async def close(self) -> None:
        """Stop; a pending `async for` ends."""
        self._events.put_nowait(_CLOSED)

    def _emit(self, events: list[DiscoveryEvent]) -> None:
        for ev in events:
            log.info("discovery: %s", ev)
            self._events.put_nowait(ev)

    def __aiter__(self):
        return self

    async def __anext__(self) -> DiscoveryEvent:
        ev = await self._events.get()
        if ev is _CLOSED:
            self._events.put_nowait(_CLOSED)   # later readers end too
            raise StopAsyncIteration
        return ev


class StaticDiscovery(Discovery):
    """Fixed pipelines: replica i (id "i") is pipelines[i], Up from the start, never Down."""

    def __init__(self, pipelines: list[list[str]]):
        super().__init__()
        if not pipelines or any(not p for p in pipelines):
            raise ValueError("StaticDiscovery needs at least one pipeline, each with >= 1 stage")
        self.pipelines = [list(p) for p in pipelines]

    async def start(self) -> None:
        self._emit([PipelineUp(str(i), list(p)) for i, p in enumerate(self.pipelines)])


# -- Kubernetes -------------------------------------------------------------------------------
STAGE_LABEL = "shardline.io/stage"
NUM_STAGES_LABEL = "shardline.io/num-stages"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
_ORDINAL = re.compile(r"-(\d+)$")


class PodTracker:
    """Worker pods in, replica events out. Pure state, no I/O: apply() one watch event or
    reset() to a full listing; each returns the PipelineUp/Down events it causes.

    Pod ordinal r of every stage's StatefulSet forms replica r. A replica is
      up        when every stage 0..S-1 has a pod that is Running, Ready and has an IP;
      draining  when the only trouble is stages whose pods are terminating (deletionTimestamp);
      down      otherwise (a stage missing, not ready, not running).
    """

    def __init__(self, port: int, stage_label: str = STAGE_LABEL,
                 num_stages_label: str = NUM_STAGES_LABEL, num_stages: Optional[int] = None):
        self.port = port
        self.stage_label = stage_label
        self.num_stages_label = num_stages_label
        self.num_stages = num_stages          # set: overrides the pods' num-stages label
        self.pods: dict[str, dict] = {}                        # uid -> pod object
        self.state: dict[str, tuple[str, list[str]]] = {}      # replica -> (up|draining, addrs)

    def apply(self, kind: str, pod: dict) -> list[DiscoveryEvent]:
        """One watch event (ADDED / MODIFIED / DELETED) with its pod object."""
        uid = pod["metadata"]["uid"]
        old = self.pods.pop(uid, None)
        if kind != "DELETED":
            self.pods[uid] = pod
        replicas = {self._replica(p) for p in (old, pod) if p is not None} - {None}
        return [ev for r in sorted(replicas, key=_num_key) for ev in self._update(r)]

    def reset(self, pods: list[dict]) -> list[DiscoveryEvent]:
        """A full listing replaces what the watch said (after a re-list)."""
        self.pods = {p["metadata"]["uid"]: p for p in pods}
        replicas = set(self.state) | {self._replica(p) for p in pods}
        return [ev for r in sorted(replicas - {None}, key=_num_key) for ev in self._update(r)]

    def _replica(self, pod: dict) -> Optional[str]:
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        if self.stage_label not in labels:
            return None
        if POD_INDEX_LABEL in labels:
            return str(int(labels[POD_INDEX_LABEL]))
        m = _ORDINAL.search(meta["name"])
        return str(int(m.group(1))) if m else None

    def _update(self, replica: str) -> list[DiscoveryEvent]:
        target, detail = self._target(replica)
        old = self.state.get(replica)
        if target == "down":
            if old is None:
                return []
            del self.state[replica]
            return [PipelineDown(replica, detail, drain=False)]
        if target == "draining":
            if old is None or old[0] == "draining":
                return []
            self.state[replica] = ("draining", old[1])
            return [PipelineDown(replica, detail, drain=True)]
        events: list[DiscoveryEvent] = []
        if old is not None:
            if old == ("up", detail):
                return []
            events.append(PipelineDown(replica, "stage addresses changed", drain=False))
        self.state[replica] = ("up", detail)
        return events + [PipelineUp(replica, detail)]

    def _target(self, replica: str):
        """("up", addresses) | ("draining", reason) | ("down", reason)."""
        pods = [p for p in self.pods.values() if self._replica(p) == replica]
        num_stages = self.num_stages
        if num_stages is None:
            counts = {(p["metadata"].get("labels") or {}).get(self.num_stages_label) for p in pods}
            if len(counts) != 1 or None in counts:
                return "down", f"replica {replica}: pods disagree on {self.num_stages_label}: {counts}"
            num_stages = int(counts.pop())
        addresses, terminating = [], []
        for stage in range(num_stages):
            cands = [p for p in pods if p["metadata"]["labels"][self.stage_label] == str(stage)]
            best = min(cands, key=lambda p: _pod_rank(p)[0], default=None)
            if best is None:
                return "down", f"replica {replica}: stage {stage} has no pod"
            rank, why, ip = _pod_rank(best)
            if rank == 2:
                return "down", f"replica {replica}: pod {best['metadata']['name']} {why}"
            if rank == 1:
                terminating.append(best["metadata"]["name"])
            addresses.append(f"{ip}:{self.port}")
        if terminating:
            return "draining", f"replica {replica}: pod {', '.join(terminating)} terminating"
        return "up", addresses


def _pod_rank(pod: dict) -> tuple[int, str, Optional[str]]:
    """(0 serving | 1 terminating | 2 not serving, why, pod IP)."""
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if pod["metadata"].get("deletionTimestamp"):
        return (1, "is terminating", ip) if ip else (2, "is terminating without an IP", ip)
    if status.get("phase") != "Running":
        return 2, f"is {status.get('phase')}", ip
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or ())
    if not ready:
        return 2, "is not ready", ip
    if not ip:
        return 2, "has no IP", ip
    return 0, "serving", ip


def _num_key(replica: str):
    return (len(replica), replica)


class KubernetesDiscovery(Discovery):
    """Worker pods found by label through the Kubernetes API (list + watch).

    The blocking `kubernetes` client runs in a thread: list, then watch from the listing's
    resourceVersion; a watch that ends (server timeout) resumes from the last resourceVersion
    seen (bookmarks included); 410 Gone re-lists; other errors retry with backoff. Pod changes
    are applied on the event loop by a PodTracker.
    """

    def __init__(self, namespace: str, label_selector: str, port: int, api=None, *,
                 stage_label: str = STAGE_LABEL, num_stages_label: str = NUM_STAGES_LABEL,
                 num_stages: Optional[int] = None, watch_timeout_s: int = 300,
                 max_backoff_s: float = 10.0):
        super().__init__()
        self.namespace = namespace
        self.label_selector = label_selector
        self.api = api
        self.watch_timeout_s = watch_timeout_s
        self.max_backoff_s = max_backoff_s
        self.tracker = PodTracker(port, stage_label, num_stages_label, num_stages)
        self._stop = threading.Event()
        self._watch = None
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def start(self) -> None:
        """Load the cluster credentials (in-cluster, else kubeconfig) and start watching."""
        if self.api is None:
            from kubernetes import client, config
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self.api = client.CoreV1Api()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._watch_forever, name="k8s-discovery", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        await super().close()

    # -- on the event loop -------------------------------------------------------------------
    def _on_list(self, pods: list[dict]) -> None:
        self._emit(self.tracker.reset(pods))

    def _on_event(self, kind: str, pod: dict) -> None:
        self._emit(self.tracker.apply(kind, pod))

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:   # the loop is closed: we are shutting down
            self._stop.set()

    # -- in the watch thread -----------------------------------------------------------------
    def _watch_forever(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        version: Optional[str] = None   # None: (re-)list first
        backoff = 0.1
        while not self._stop.is_set():
            try:
                if version is None:
                    resp = self.api.list_namespaced_pod(
                        self.namespace, label_selector=self.label_selector, _preload_content=False)
                    listing = json.loads(resp.data)
                    version = listing["metadata"]["resourceVersion"]
                    self._post(self._on_list, listing["items"])
                self._watch = watch.Watch()
                if self._stop.is_set():
                    break
                for ev in self._watch.stream(
                        self.api.list_namespaced_pod, self.namespace,
                        label_selector=self.label_selector, resource_version=version,
                        allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout_s,
                        _request_timeout=self.watch_timeout_s + 30):
                    obj = ev["raw_object"]
                    version = obj["metadata"].get("resourceVersion") or version
                    if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._post(self._on_event, ev["type"], obj)
                    if self._stop.is_set():
                        break
                backoff = 0.1   # the server ended the watch (timeout_seconds): resume at once
                continue
            except ApiException as e:
                if e.status == 410:
                    log.info("discovery: resourceVersion %s expired (410 Gone); re-listing", version)
                    version = None
                    continue
                log.warning("discovery: Kubernetes API error %s %s; retrying in %.1fs",
                            e.status, e.reason, backoff)
            except Exception as e:   # connection trouble, timeouts: keep watching
                if self._stop.is_set():
                    break
                log.warning("discovery: watch failed (%r); retrying in %.1fs", e, backoff)
            self._stop.wait(backoff)
            backoff = min(self.max_backoff_s, backoff * 2)
