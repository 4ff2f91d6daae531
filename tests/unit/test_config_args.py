"""common/config_args.py: the services' flags come from their config dataclasses, and
`shardline up` forwards its flags to the children it starts."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

import pytest

from shardline.common.auth import SecurityConfig
import torch

from shardline import launcher
from shardline.common.config_args import add_config_args, config_argv, config_from_args, option
from shardline.common.dtypes import DEFAULT_DTYPE
from shardline.scheduler.config import SchedulerConfig
from shardline.tokenizer.config import TokenizerConfig
from shardline.worker.build import kv_cache_budget
from shardline.worker.config import (DEFAULT_CPU_KV_CACHE_BYTES, DEFAULT_CUDA_KV_CACHE_FRACTION,
                                     WEIGHT_FIELDS, WorkerConfig)

CONFIGS = [WorkerConfig, SchedulerConfig, TokenizerConfig]


def parser_of(cls) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cls.add_args(p)
    return p


def parse(cls, argv: list[str]):
    return cls.from_args(parser_of(cls).parse_args(argv))


@pytest.mark.parametrize("make", [lambda: parser_of(WorkerConfig), lambda: parser_of(SchedulerConfig),
                                  lambda: parser_of(TokenizerConfig), launcher.build_parser],
                         ids=["worker", "scheduler", "tokenizer", "up"])
def test_every_flag_has_help(make):
    bare = [a.option_strings for a in make()._actions if not a.help or a.help == argparse.SUPPRESS]
    assert not bare


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_is_a_flag(cls):
    dests = {a.dest for a in parser_of(cls)._actions}
    # `security` is a SecurityConfig whose own fields are the flags
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "security"}
    assert fields | {f.name for f in dataclasses.fields(SecurityConfig)} <= dests
    cfg = parse(cls, ["--cluster-token-file", "/t", "--tokenizer", "t:1", "--pipeline", "a:1"]
                if cls is SchedulerConfig else ["--cluster-token-file", "/t"])
    assert cfg.security == SecurityConfig(cluster_token_file="/t")


def test_defaults_are_the_dataclasses(monkeypatch):
    monkeypatch.delenv("SHARDLINE_CACHE", raising=False)
    assert parse(WorkerConfig, []) == WorkerConfig()
    assert parse(TokenizerConfig, []) == TokenizerConfig()
    assert parse(SchedulerConfig, ["--tokenizer", "t:1", "--pipeline", "a:1"]) == \
        SchedulerConfig(tokenizer="t:1", pipelines=[["a:1"]])
    w = WorkerConfig()
    assert (w.dtype, w.kv_cache_fraction, w.kv_cache_bytes()) == \
        (DEFAULT_DTYPE, DEFAULT_CUDA_KV_CACHE_FRACTION, None)
    assert kv_cache_budget(torch.device("cpu"), None, 0.8) == DEFAULT_CPU_KV_CACHE_BYTES


def test_worker_flags():
    cfg = parse(WorkerConfig, [
        "--model", "/m", "--port", "7", "--stage-index", "1", "--num-stages", "3",
        "--layers", "2:4", "--device", "cuda:1", "--dtype", "float16", "--kv-cache-memory",
        "64MiB", "--kv-cache-fraction", "0.5", "--block-size", "32", "--threads", "2",
        "--log-level", "debug", "--no-fuse", "--quantize", "int4", "--group-size", "64",
        "--quantize-head", "--prune", "2:4", "--prune-calibration", "--compile",
        "--no-cpu-kernels", "--metrics-port", "9"])
    assert cfg == WorkerConfig(
        model="/m", port=7, stage_index=1, num_stages=3, layers="2:4", device="cuda:1",
        dtype="float16", kv_cache_memory="64MiB", kv_cache_fraction=0.5, block_size=32,
        threads=2, log_level="DEBUG", fuse=False, quantize="int4", group_size=64,
        quantize_head=True, prune="2:4", prune_calibration=True, torch_compile=True,
        cpu_kernels=False, metrics_port=9)
    with pytest.raises(SystemExit):
        parser_of(WorkerConfig).parse_args(["--dtype", "float64"])


def test_scheduler_flags():
    cfg = parse(SchedulerConfig, [
        "--tokenizer", "t:1", "--pipeline", "a:1,b:2", "--pipeline", "c:3", "--port", "5",
        "--connect-timeout", "5", "--step-timeout", "10", "--rpc-timeout", "3",
        "--unavailable-timeout", "2", "--no-prefix-caching", "--no-async-scheduling",
        "--routing", "random", "--redis-url", "redis://r:6379/0", "--redis-ttl", "60",
        "--max-num-seqs", "8", "--max-num-batched-tokens", "128", "--metrics-port", "9"])
    assert cfg == SchedulerConfig(
        tokenizer="t:1", pipelines=[["a:1", "b:2"], ["c:3"]], port=5, connect_timeout_s=5.0,
        step_timeout_s=10.0, rpc_timeout_s=3.0, unavailable_timeout_s=2.0,
        enable_prefix_caching=False, async_scheduling=False, routing="random",
        redis_url="redis://r:6379/0", redis_ttl_s=60, max_num_seqs=8,
        max_num_batched_tokens=128, metrics_port=9)
    k8s = parse(SchedulerConfig, ["--tokenizer", "t:1", "--discovery", "kubernetes",
                                  "--k8s-selector", "app=w", "--k8s-namespace", "ns"])
    assert (k8s.pipelines, k8s.k8s_selector, k8s.k8s_namespace) == ([], "app=w", "ns")
    with pytest.raises(SystemExit):                      # --tokenizer is required
        parser_of(SchedulerConfig).parse_args(["--pipeline", "a:1"])


def test_env_fallback_is_read_when_parsing(monkeypatch):
    monkeypatch.setenv("SHARDLINE_CACHE", "/cache")
    assert parse(WorkerConfig, []).cache_dir == "/cache"
    assert parse(WorkerConfig, ["--cache-dir", "/c"]).cache_dir == "/c"


def test_argv_round_trip():
    # config_argv writes only what differs from the defaults, and parses back to the same
    cfg = WorkerConfig(fuse=False, quantize="int8", quantize_head=True, torch_compile=True,
                       cpu_kernels=False, prune="0.5", block_size=8)
    names = ["block_size", *WEIGHT_FIELDS]
    argv = config_argv(WorkerConfig, cfg, names)
    assert config_argv(WorkerConfig, WorkerConfig(), names) == []
    assert "--no-fuse" in argv and "--compile" in argv and "--no-cpu-kernels" in argv
    assert parse(WorkerConfig, argv) == cfg


def test_helper_on_a_small_dataclass():
    @dataclasses.dataclass
    class Small:
        name: str = option(help="required name")
        size: Optional[int] = option(None, help="a size")
        on: bool = option(False, flag="--switch", help="a switch")
        tags: list[str] = option(default_factory=list, flag="--tag", help="repeatable")
        hidden: int = dataclasses.field(default=3)            # no option(): no flag

    p = argparse.ArgumentParser()
    add_config_args(Small, p)
    assert config_from_args(Small, p.parse_args(["--name", "n"])) == Small(name="n")
    ns = p.parse_args(["--name", "n", "--size", "4", "--switch", "--tag", "a", "--tag", "b"])
    assert config_from_args(Small, ns, hidden=5) == Small("n", 4, True, ["a", "b"], 5)
    assert "--hidden" not in p.format_help()
    with pytest.raises(KeyError):
        add_config_args(Small, argparse.ArgumentParser(), ["hidden"])


def _child_config(stack, name: str):
    argv = stack.child(name).argv
    cls = {"tokenizer": TokenizerConfig, "scheduler": SchedulerConfig}.get(argv[0], WorkerConfig)
    return parse(cls, argv[1:])


def test_up_forwards_its_flags_to_the_children():
    a = launcher.build_parser().parse_args([
        "--stages", "2", "--port", "5", "--log-level", "debug", "--dtype", "float32",
        "--kv-cache-memory", "64MiB", "--kv-cache-fraction", "0.5", "--block-size", "32",
        "--no-fuse", "--quantize", "int4", "--group-size", "64", "--compile", "--no-cpu-kernels",
        "--max-num-seqs", "8", "--no-prefix-caching", "--routing", "random",
        "--redis-url", "redis://r:6379/0", "--drain-timeout-s", "12"])
    stack = launcher.stack_from_args(a, "/models/m")
    # every child drains as long, and the stack waits for that before SIGKILL
    assert stack.drain_timeout_s == 12
    for c in stack.children:
        assert _child_config(stack, c.name).drain_timeout_s == 12, c.name
    tok = _child_config(stack, "tokenizer")
    assert (tok.model, tok.log_level) == ("/models/m", "DEBUG")
    for s in range(2):
        w = _child_config(stack, f"worker-{s}")
        assert (w.model, w.stage_index, w.num_stages, w.dtype, w.kv_cache_memory,
                w.kv_cache_fraction, w.block_size, w.fuse, w.quantize, w.group_size,
                w.torch_compile, w.cpu_kernels, w.log_level) == \
            ("/models/m", s, 2, "float32", "64MiB", 0.5, 32, False, "int4", 64, True, False,
             "DEBUG")
    sch = _child_config(stack, "scheduler")
    assert (sch.port, sch.max_num_seqs, sch.enable_prefix_caching, sch.routing, sch.redis_url,
            len(sch.pipelines[0])) == (5, 8, False, "random", "redis://r:6379/0", 2)


def test_up_defaults_are_the_services():
    stack = launcher.stack_from_args(launcher.build_parser().parse_args([]), "/models/m")
    w = _child_config(stack, "worker-0")
    default = WorkerConfig()
    for name in ("dtype", "kv_cache_memory", "kv_cache_fraction", "block_size", *WEIGHT_FIELDS):
        assert getattr(w, name) == getattr(default, name), name
    sch = _child_config(stack, "scheduler")
    assert sch.port == SchedulerConfig.port and sch.max_num_seqs == SchedulerConfig.max_num_seqs
