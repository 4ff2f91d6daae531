"""The default configuration, served as a user gets it: bfloat16, the CPU-kernel backend where
the CPU has AVX512-BF16, the module weights released (the kernels hold their own copy).

bf16 rounding may move a greedy choice where the top two logits nearly tie, and every later
token then follows a different text, so the check is teacher-forced: HF transformers in
float32 reads the prompt and the tokens the stack generated, and its top-1 at each generated
position must be the token the stack chose (at least AGREEMENT of them; the first generated
token of every prompt exactly).
"""
from __future__ import annotations

import pathlib

import pytest
import torch

from shardline.client import Client

from .conftest import RunningStack
from .test_generate import CHATS, RAW_PROMPTS, chat_ids

N = 16
AGREEMENT = 0.95
MORE_PROMPTS = ["Water boils at a temperature of", "import numpy as np\n\ndef softmax(x):"]


@pytest.fixture(scope="module")
def bf16_stack(model_dir):
    with RunningStack(model_dir, stages=1, dtype="bfloat16", threads=2) as s:
        yield s


@pytest.fixture(scope="module")
def hf32(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tok, model


def _teacher_forced_top1(model, prompt: list[int], generated: list[int]) -> list[int]:
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + generated])).logits[0]
    return logits[len(prompt) - 1:len(prompt) - 1 + len(generated)].argmax(-1).tolist()


def test_default_config_agrees_with_float32_reference(bf16_stack, hf32):
    tok, model = hf32
    agree = total = 0
    with Client(bf16_stack.address) as c:
        assert c.model_info().dtype == "bfloat16"
        cases = [(p, tok(p)["input_ids"], None) for p in RAW_PROMPTS + MORE_PROMPTS]
        cases += [(None, chat_ids(tok, m), m) for m in CHATS]
        for text, ids, messages in cases:
            out = (c.generate(text, max_tokens=N, ignore_eos=True) if messages is None else
                   c.generate(messages=messages, max_tokens=N, ignore_eos=True))
            assert out.usage.prompt_tokens == len(ids)
            assert len(out.token_ids) == N
            ref = _teacher_forced_top1(model, list(ids), out.token_ids)
            assert ref[0] == out.token_ids[0], (text or messages)
            agree += sum(a == b for a, b in zip(ref, out.token_ids))
            total += N
    assert agree / total >= AGREEMENT, f"{agree}/{total} positions agree with float32"


def test_default_config_serves_on_the_cpu_kernels_with_weights_released(bf16_stack):
    if not torch.cpu._is_avx512_bf16_supported():
        pytest.skip("this CPU has no AVX512-BF16: bf16 stages run on the PyTorch backend")
    log = "".join(bf16_stack.stack.child("worker-0").tail)
    assert "cpu-kernels backend" in log, log
    assert "released" in log and "MiB of module weights" in log, log


def test_scheduler_process_loads_no_torch(bf16_stack):
    """The running scheduler (and its gRPC, Redis and tracing libraries) maps no libtorch."""
    pid = bf16_stack.stack.child("scheduler").proc.pid
    maps = pathlib.Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in maps and "libc10" not in maps
    worker_maps = pathlib.Path(f"/proc/{bf16_stack.stack.child('worker-0').proc.pid}/maps")
    assert "libtorch" in worker_maps.read_text()          # the check can see torch at all
