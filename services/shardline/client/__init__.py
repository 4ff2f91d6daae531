"""Python client for Shardline."""
from shardline.client.client import Chunk, Client, Completion, Usage, build_request

__all__ = ["Client", "Completion", "Chunk", "Usage", "build_request"]
