"""Names of the dtypes a stage computes in: the one list every flag, config and message uses.

No torch here (the scheduler and `shardline up` import it); `common.tensors` maps the names
to torch dtypes for the processes that have torch.
"""
from __future__ import annotations

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEFAULT_DTYPE = "bfloat16"           # every device; float32 is the reference
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def canonical_dtype(name: str) -> str:
    """A dtype name or alias (bf16, fp32, ...) as one of DTYPE_NAMES; ValueError otherwise."""
    canon = _ALIASES.get(name, name)
    if canon not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, got {name!r}")
    return canon
