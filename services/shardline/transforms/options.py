"""Which transforms a stage's weights get, and their defaults: torch-free, so the worker's
config (imported by `shardline up`, which loads no torch) takes its flag defaults from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

QUANTIZE_MODES = ("none", "int8", "int4", "fp8")
PruneSpec = Union[float, tuple[int, int]]


def parse_prune(spec: Union[str, float, None]) -> Optional[PruneSpec]:
    """"0.5" -> 0.5 (unstructured ratio); "2:4" -> (2, 4) (keep n of every m); None/"none"/"0"
    -> None."""
    if spec is None or spec in ("none", "0", 0):
        return None
    if isinstance(spec, str) and ":" in spec:
        n, m = (int(v) for v in spec.split(":"))
        if not 0 < n < m:
            raise ValueError(f"--prune {spec}: need 0 < n < m in n:m")
        return n, m
    ratio = float(spec)
    if not 0 <= ratio < 1:
        raise ValueError(f"--prune ratio must be in [0, 1), got {spec}")
    return ratio or None


@dataclass(frozen=True)
class StageTransforms:
    """Which transforms a stage's weights get (the worker's weight flags)."""
    fuse: bool = True                   # fused qkv / gate_up / residual adds (fuse.py)
    quantize: str = "none"              # none | int8 | int4 | fp8 weight-only (quantize.py)
    group_size: int = 32                # int4 group size
    quantize_head: bool = False         # also quantize the LM head
    prune: Optional[str] = None         # "0.5" (unstructured ratio) or "2:4" (prune.py)
    prune_calibration: bool = False     # activation-aware pruning scores (calibration.py)
    torch_compile: bool = False         # torch.compile each layer's dense parts (compile.py)

    def __post_init__(self):
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {self.quantize!r}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be > 0, got {self.group_size}")
        parse_prune(self.prune)
