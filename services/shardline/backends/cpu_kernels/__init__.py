"""The CPU-kernel step backend: bf16 (and int8 / int4) stages on the project's AVX512-BF16 /
VNNI / AMX C++ kernels (csrc/), compiled once per source version (build.py), with weights
converted once into the kernels' layouts (layouts.py) and each decoder layer one call
(backend.py: CpuKernelBackend).
"""
