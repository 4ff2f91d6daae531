"""The project's own model code: configs (config.py), layers (layers.py), the reference
paged attention and its per-step metadata (attention.py), the decoder cut to a layer range
(decoder.py: StageModel), the paged KV tensors (kv_cache.py), safetensors loading
(weights.py) and which slices a tensor-parallel rank holds (parallel.py). Plain PyTorch that
reads like the paper; quantization, fusion and parallelism are transforms applied from outside
(transforms/).

May import common only; never transforms, backends, the worker or any service.
"""
