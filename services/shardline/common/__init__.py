"""What every service shares: the gRPC server bootstrap and error mapping (server.py),
tracing and metrics set-up (telemetry.py), model sources (model_source.py: the default
model's GGUF, local directories, .gguf files, hub ids), dtype names (dtypes.py), tensors on
the wire (tensors.py: the only torch user here, imported by torch processes only), byte units,
process spawning and config-to-flags helpers.

Imports no other shardline package (except the generated v1 messages).
"""
