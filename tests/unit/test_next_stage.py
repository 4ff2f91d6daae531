"""Where a stage may forward (worker/servicer.py `_may_forward_to`): its --next-stage entries,
by address or by what their DNS names resolve to (a headless Service lists the next stage's
pods; the scheduler routes by pod IP or by pod DNS name), never anywhere else."""
import asyncio

import pytest

from shardline.worker.servicer import StageWorkerServicer


def may_forward(next_stages, address) -> bool:
    return asyncio.run(StageWorkerServicer("m", next_stages)._may_forward_to(address))


@pytest.mark.parametrize("next_stages, address, allowed", [
    (["localhost:5000"], "localhost:5000", True),           # the entry itself
    (["localhost:5000"], "127.0.0.1:5000", True),           # an address its name resolves to
    (["127.0.0.1:5000"], "localhost:5000", True),           # a name resolving to the entry
    (["localhost:5000"], "127.0.0.1:5001", False),          # another port
    (["localhost:5000"], "10.0.0.9:5000", False),           # an address the name lacks
    (["localhost:5000"], "nonexistent.invalid:5000", False),  # resolves to nothing
    (["localhost:5000"], "no-port", False),
    ([], "127.0.0.1:5000", False),                          # nothing configured: nowhere
])
def test_forwarding_is_limited_to_the_next_stages(next_stages, address, allowed):
    assert may_forward(next_stages, address) is allowed
