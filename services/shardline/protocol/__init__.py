"""The scheduler <-> worker contract, as domain objects: step plans (`SeqStep`, with each
sequence's `SamplingConfig` on admission), sampled tokens (`SampledToken`), the route key of a
Step stream, and the limits both sides enforce. Each object owns its `from_pb` / `to_pb`.

Imports only the generated `shardline.v1` messages: no torch, nothing of the worker or the
scheduler, so both sides (and the torch-free scheduler process) can import it.
"""
