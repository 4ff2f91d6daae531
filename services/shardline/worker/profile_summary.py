"""A recorded profile's time per operator category (StageWorker.Profile's summary rows).

Each recorded step is one `shardline::step` range on the step thread; inside it every operator
counts in the category of its outermost categorized ancestor (itself included), so an
`aten::addmm` inside `aten::linear`, a `softmax` inside scaled-dot-product attention or a copy
inside the sampler is counted once, in the outer one's category. What no category claims is
"other"; the recording window's wall time outside steps is "idle".

Works on torch.profiler's FunctionEvents (name, time_range, cpu_children, device_time_total,
device_type) without importing torch, so it is tested on plain stand-ins.
"""
from __future__ import annotations

from typing import Iterable, Optional

# record_function ranges the worker adds while it records (worker/profiler.py, the servicer)
STEP_RANGE = "shardline::step"
DECODE_RANGE = "shardline::decode_request"     # the plan and hidden states out of protobuf
ENCODE_RANGE = "shardline::encode_response"    # the forwarded request or result into protobuf
SAMPLE_RANGE = "shardline::sample"             # the sampler (last stage)
# the CPU kernels' native calls are invisible to the profiler: their Python entry points are
# wrapped in these ranges while recording (a StepLayer call is a whole decoder layer: its
# linears and attention together, not split)
CPU_LAYERS_RANGE = "shardline::cpu_kernels.layers"
CPU_LOGITS_RANGE = "shardline::cpu_kernels.logits"

CATEGORIES = ("linears", "attention", "sampling", "copies", "grpc", "fused_layers", "other",
              "idle")

_EXACT = {
    "linears": {"aten::linear", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul",
                "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation", "aten::_int_mm",
                "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm", "aten::_scaled_mm",
                CPU_LOGITS_RANGE},
    "attention": {"aten::index_select"},
    "sampling": {SAMPLE_RANGE, "aten::argmax", "aten::softmax", "aten::_softmax",
                 "aten::log_softmax", "aten::_log_softmax", "aten::topk", "aten::sort",
                 "aten::exponential_", "aten::multinomial"},
    "copies": {"aten::copy_", "aten::to", "aten::_to_copy", "aten::index_copy_",
               "aten::index_copy", "aten::clone", "aten::contiguous"},
    "grpc": {DECODE_RANGE, ENCODE_RANGE},
    "fused_layers": {CPU_LAYERS_RANGE},
}
_BY_NAME = {name: cat for cat, names in _EXACT.items() for name in names}
_ATTENTION_PARTS = ("scaled_dot_product", "flash_attention", "efficient_attention",
                    "cudnn_attention", "shardline::attention")


def category_of(name: str) -> Optional[str]:
    """The category of an operator or range by its name, None when it has none."""
    cat = _BY_NAME.get(name)
    if cat is not None:
        return cat
    if any(part in name for part in _ATTENTION_PARTS):
        return "attention"
    if name.startswith("Memcpy") or name.startswith("Memset"):
        return "copies"
    return None


def _us(ev) -> float:
    return max(0.0, ev.time_range.end - ev.time_range.start)


def _on_host(ev) -> bool:
    return getattr(getattr(ev, "device_type", None), "name", "CPU") == "CPU"


def _claimed(step) -> Iterable[tuple[str, object]]:
    """(category, event) of the outermost categorized events under a step range."""
    todo = list(step.cpu_children)
    while todo:
        ev = todo.pop()
        cat = category_of(ev.name)
        if cat is not None:
            yield cat, ev
        else:
            todo.extend(ev.cpu_children)


def summarize(events, window_s: float) -> tuple[list[tuple[str, float, float]], float]:
    """([(category, host seconds, device seconds)] in CATEGORIES order, seconds in steps).
    events: the profile's FunctionEvents; window_s: the recording window's wall time."""
    cpu = dict.fromkeys(CATEGORIES, 0.0)
    dev = dict.fromkeys(CATEGORIES, 0.0)
    step_cpu = step_dev = 0.0
    for step in events:
        if step.name != STEP_RANGE or not _on_host(step):
            continue
        step_cpu += _us(step)
        step_dev += getattr(step, "device_time_total", 0.0)
        for cat, ev in _claimed(step):
            cpu[cat] += _us(ev)
            dev[cat] += getattr(ev, "device_time_total", 0.0)
    in_categories_cpu = sum(cpu.values())
    in_categories_dev = sum(dev.values())
    cpu["other"] = max(0.0, step_cpu - in_categories_cpu)
    dev["other"] = max(0.0, step_dev - in_categories_dev)
    window_us = window_s * 1e6
    cpu["idle"] = max(0.0, window_us - step_cpu)
    dev["idle"] = max(0.0, window_us - step_dev) if step_dev else 0.0
    rows = [(cat, cpu[cat] / 1e6, dev[cat] / 1e6) for cat in CATEGORIES]
    return rows, step_cpu / 1e6
