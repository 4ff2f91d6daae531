"""Weight transforms: plain functions on a loaded stage (models.decoder.StageModel).

    fuse.py       q/k/v -> qkv, gate/up -> gate_up, in-place residual adds
    quantize.py   int8 / int4 / fp8 weight-only Linear modules
    prune.py      unstructured or 2:4 magnitude (or activation-aware) pruning
    shard.py      tensor parallelism: a rank's slices (models/parallel.py) + its collectives
    compile.py    torch.compile of each layer's dense parts
    calibration.py  the calibration corpus and activation statistics
    recipe.py     optimized checkpoints (saved after pruning / quantization)
    stage.py      build_stage: load + the transforms a stage asks for, in one order

May import models and common; never the worker, backends, scheduler or gRPC code.
"""
