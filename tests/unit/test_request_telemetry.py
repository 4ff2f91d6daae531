"""What a request leaves behind: its counters by status and tenant (DEADLINE_EXCEEDED when its
deadline passed), its queue time, its id on log lines and spans and in the response metadata."""
import asyncio
import logging
import re

import pytest
from opentelemetry import trace

from shardline.common import telemetry
from shardline.common.server import InvalidArgument
from shardline.common.telemetry import RequestIdFilter
from shardline.scheduler.generation import REQUEST_ID_KEY
from shardline.scheduler.metrics import TenantLabels
from shardline.scheduler.servicer import GenerationServicer
from tests.unit.fake_pipeline import until
from tests.unit.test_admission import Clock, FakeTokenizer, make_generation, make_router, \
    request, sample

FORMAT = "%(levelname)s %(name)s: %(message)s%(request_tag)s"   # as configure_logging's


async def drain(stream) -> list:
    return [resp async for resp in stream]


def test_a_finished_request_is_counted_by_status_and_tenant_with_its_queue_time():
    async def body():
        clock = Clock()
        router, _ = await make_router(clock, 0.0, 4, "a")
        gen = make_generation(router)
        stream = await gen.open(request(max_tokens=3), "acme")
        clock.now = 3.0                       # the engine admits it after 3 s (its clock)
        chunks = await asyncio.wait_for(drain(stream), 60)
        assert chunks[-1].finish_reason == "length"
        await router.close()

    before = (sample("shardline_requests_total", status="OK"),
              sample("shardline_tenant_requests_total", tenant="acme", status="OK"),
              sample("shardline_queue_time_seconds_count"),
              sample("shardline_queue_time_seconds_sum"))
    asyncio.run(body())
    after = (sample("shardline_requests_total", status="OK"),
             sample("shardline_tenant_requests_total", tenant="acme", status="OK"),
             sample("shardline_queue_time_seconds_count"),
             sample("shardline_queue_time_seconds_sum"))
    assert [a - b for a, b in zip(after, before)] == [1, 1, 1, 3.0]


def test_tenant_labels_are_bounded():
    labels = TenantLabels(limit=2)
    assert [labels.label(t) for t in ("a", "b", "c", "a", "", "b")] == \
        ["a", "b", "other", "a", "default", "b"]
    assert TenantLabels().label("x" * 500) == "x" * 64


class FakeContext:
    """A servicer context whose deadline has passed."""

    def __init__(self):
        self.initial_metadata = None

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return 0.0

    async def send_initial_metadata(self, metadata):
        self.initial_metadata = metadata


class StalledTokenizer(FakeTokenizer):
    """Tokenizes nothing until cancelled."""

    def __init__(self):
        self.called = asyncio.Event()

    async def tokenize(self, text):
        self.called.set()
        await asyncio.Event().wait()


def test_streams_ended_by_their_deadline_count_as_deadline_exceeded():
    async def body():
        router, fakes = await make_router(Clock(), 0.0, 4, "a")
        servicer = GenerationServicer(make_generation(router))
        ctx = FakeContext()
        fakes["a"].gate.clear()               # no token comes before the deadline
        task = asyncio.ensure_future(
            servicer.Generate(request(request_id="dl-1"), ctx).__anext__())
        await until(fakes["a"].sent, lambda: fakes["a"].requests)
        assert ctx.initial_metadata == ((REQUEST_ID_KEY, "dl-1"),)
        task.cancel()                         # grpc cancels the handler when the deadline passes
        with pytest.raises(asyncio.CancelledError):
            await task
        # the deadline passes while the prompt is being tokenized
        stalled = StalledTokenizer()
        servicer.generation.tokenizer = stalled
        task = asyncio.ensure_future(servicer.Generate(
            generate_request_text(), FakeContext()).__anext__())
        await asyncio.wait_for(stalled.called.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await router.close()

    before = sample("shardline_requests_total", status="DEADLINE_EXCEEDED")
    cancelled = sample("shardline_requests_total", status="CANCELLED")
    asyncio.run(body())
    assert sample("shardline_requests_total", status="DEADLINE_EXCEEDED") == before + 2
    assert sample("shardline_requests_total", status="CANCELLED") == cancelled


def generate_request_text():
    req = request()
    req.text = "hello"
    return req


def test_log_lines_about_a_request_carry_its_id(caplog):
    caplog.set_level(logging.DEBUG, logger="shardline.scheduler")
    caplog.handler.addFilter(RequestIdFilter())
    caplog.handler.setFormatter(logging.Formatter(FORMAT))
    other = logging.getLogger("shardline.scheduler.test")

    async def body():
        router, _ = await make_router(Clock(), 0.0, 4, "a")
        gen = make_generation(router)
        stream = await gen.open(request(request_id="req-42"), "")
        other.info("later in the same request's task")
        await asyncio.wait_for(drain(stream), 60)
        generated = await gen.open(request(), "")
        generated.close()
        with pytest.raises(InvalidArgument, match="request_id must be"):
            await gen.open(request(request_id="two words"), "")
        await router.close()
        return generated.request_id

    generated_id = asyncio.run(body())
    assert re.fullmatch(r"[0-9a-f]{32}", generated_id)
    text = caplog.text
    assert re.search(r"queued seq 1: 3 prompt tokens.* request_id=req-42$", text, re.M)
    assert re.search(r"later in the same request's task request_id=req-42$", text, re.M)
    assert re.search(r"seq 1 ended: OK, 2 tokens generated request_id=req-42$", text, re.M)
    assert re.search(rf"queued seq 2: .* request_id={generated_id}$", text, re.M)
    refused = [r for r in caplog.records if r.getMessage().startswith("refused (invalid_argument)")]
    assert refused and refused[0].request_id != "two words"    # never an unchecked id


def test_the_request_id_is_an_attribute_of_the_request_span_and_its_queue_span(spans):
    async def body():
        router, _ = await make_router(Clock(), 0.0, 4, "a")
        gen = make_generation(router)
        with telemetry.tracer.start_as_current_span("shardline.v1.Generation/Generate",
                                                    kind=trace.SpanKind.SERVER):
            stream = await gen.open(request(request_id="span-7"), "")
            await asyncio.wait_for(drain(stream), 60)
        await router.close()

    asyncio.run(body())
    by_name = {s.name: s for s in spans.get_finished_spans()}
    assert by_name["shardline.v1.Generation/Generate"].attributes["shardline.request_id"] == "span-7"
    assert by_name["queue"].attributes["shardline.request_id"] == "span-7"


def test_an_unchecked_request_id_is_logged_escaped():
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "refused", (), None)
    record.request_id = "forged\nINFO all is well"          # as a raw proto field, via extra
    RequestIdFilter().filter(record)
    assert "\n" not in record.request_tag and record.request_tag.startswith(" request_id='forged")
