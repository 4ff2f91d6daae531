"""Offline tools, apart from serving code: `shardline optimize` (write a pruned / quantized
checkpoint) and `shardline perplexity` (score the model on the built-in corpus, through the
same transforms and backends a worker uses). May import common, models, transforms,
backends and the worker's runner; no service imports them.
"""
