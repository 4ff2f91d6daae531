"""A replica's batch limits (scheduler/batch_limits.py): the scheduler's flags where given,
else the least device default of its stages (their GetInfo), the step budget never over the
stages' --max-step-tokens; and the workers' per-device table (worker/config.py)."""
from shardline.scheduler.batch_limits import (FALLBACK_MAX_NUM_BATCHED_TOKENS,
                                              FALLBACK_MAX_NUM_SEQS, choose_batch_limits)
from shardline.scheduler.engine import PipelineEngine
from shardline.v1 import worker_pb2
from shardline.worker.config import (CPU_MAX_NUM_BATCHED_TOKENS, CPU_MAX_NUM_SEQS,
                                     CUDA_MAX_NUM_BATCHED_TOKENS, CUDA_MAX_NUM_SEQS,
                                     batch_defaults)
from tests.unit.fake_pipeline import STEP_TIMEOUT_S, FakePipeline


def stage(seqs: int, tokens: int, cap: int = 8192) -> worker_pb2.StageInfo:
    return worker_pb2.StageInfo(default_max_num_seqs=seqs, default_max_num_batched_tokens=tokens,
                                max_step_tokens=cap)


def test_the_device_table():
    assert batch_defaults("cpu") == (CPU_MAX_NUM_SEQS, CPU_MAX_NUM_BATCHED_TOKENS) == (64, 512)
    assert batch_defaults("cuda") == batch_defaults("cuda:1") == (256, 8192)
    assert (CUDA_MAX_NUM_SEQS, CUDA_MAX_NUM_BATCHED_TOKENS) == (256, 8192)
    assert batch_defaults("mps") == batch_defaults("cpu")      # no entry: the CPU's


def test_unset_flags_take_the_workers_defaults():
    lim = choose_batch_limits(0, 0, [stage(256, 8192)], 8192)
    assert (lim.max_num_seqs, lim.max_num_batched_tokens) == (256, 8192)
    assert (lim.seqs_from, lim.tokens_from) == ("workers", "workers")
    assert "max_num_seqs=256 (workers)" in lim.describe()


def test_explicit_flags_override_the_workers():
    lim = choose_batch_limits(8, 128, [stage(256, 8192)], 8192)
    assert (lim.max_num_seqs, lim.max_num_batched_tokens) == (8, 128)
    assert (lim.seqs_from, lim.tokens_from) == ("flag", "flag")
    lim = choose_batch_limits(8, 0, [stage(256, 8192)], 8192)          # one flag, one default
    assert (lim.max_num_seqs, lim.max_num_batched_tokens) == (8, 8192)


def test_stages_that_disagree_give_the_least():
    """A CPU stage and a CUDA stage in one pipeline: the CPU's limits, field by field."""
    lim = choose_batch_limits(0, 0, [stage(256, 8192), stage(64, 512), stage(300, 4096)], 8192)
    assert (lim.max_num_seqs, lim.max_num_batched_tokens) == (64, 512)
    lim = choose_batch_limits(0, 0, [stage(32, 8192), stage(64, 512)], 8192)
    assert (lim.max_num_seqs, lim.max_num_batched_tokens) == (32, 512)
    # a stage that reports nothing (an older worker) does not count
    lim = choose_batch_limits(0, 0, [stage(0, 0), stage(256, 8192)], 8192)
    assert (lim.max_num_seqs, lim.max_num_batched_tokens) == (256, 8192)


def test_the_stages_step_cap_clamps_defaults_and_flags():
    lim = choose_batch_limits(0, 0, [stage(256, 8192)], 4096)
    assert lim.max_num_batched_tokens == 4096 and lim.tokens_from == "max_step_tokens"
    assert "not 8192" in lim.describe()
    lim = choose_batch_limits(0, 20000, [stage(256, 8192)], 8192)
    assert lim.max_num_batched_tokens == 8192 and lim.requested_tokens == 20000
    lim = choose_batch_limits(0, 1024, [stage(64, 512)], 0)              # 0: no cap said
    assert lim.max_num_batched_tokens == 1024


def test_workers_that_report_nothing_get_the_fallback():
    lim = choose_batch_limits(0, 0, [], 0)
    assert (lim.max_num_seqs, lim.max_num_batched_tokens) == (FALLBACK_MAX_NUM_SEQS,
                                                              FALLBACK_MAX_NUM_BATCHED_TOKENS)
    assert lim.seqs_from == lim.tokens_from == "fallback"


def test_the_engine_plans_with_the_chosen_limits():
    fake = FakePipeline(max_step_tokens=1024)
    fake.infos = [stage(256, 8192, 1024), stage(128, 8192, 2048)]
    engine = PipelineEngine(fake, 0, 0, step_timeout_s=STEP_TIMEOUT_S)
    assert engine.scheduler.max_num_seqs == 128
    assert engine.scheduler.max_num_batched_tokens == 1024
    engine = PipelineEngine(fake, 16, 64, step_timeout_s=STEP_TIMEOUT_S)
    assert (engine.scheduler.max_num_seqs, engine.scheduler.max_num_batched_tokens) == (16, 64)
