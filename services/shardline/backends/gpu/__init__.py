"""The GPU engine: a fixed-shape step behind the `StepBackend` interface.

    triton_attention    paged attention kernels that read the block table (decode split-K,
                        prefill with a cached prefix; sliding window and logit soft-capping)

Every part also runs on the CPU (the step eagerly, the Triton kernels under
TRITON_INTERPRET=1), so tests/gpu/ checks its logic on a machine without CUDA.
"""
