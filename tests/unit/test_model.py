"""The stage model against HF transformers: same tokens, whatever the split, batch or chunking."""
from __future__ import annotations

import random

import pytest
import torch

from shardline.models.attention import AttentionMetadata
from shardline.protocol.plan import SamplingConfig, SeqStep
from shardline.worker.build import load_runner
from shardline.worker.runner import StageRunner

PROMPTS = [
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
]
NEW_TOKENS = 32
BLOCK_SIZE = 16


class Driver:
    """A minimal scheduler: admits prompts (optionally staggered), prefills them in chunks,
    decodes greedily, allocates blocks from a shuffled pool and frees finished sequences.
    Steps run through a chain of stage runners, hidden states passed along."""

    def __init__(self, runners: list[StageRunner], seed: int = 0):
        self.runners = runners
        blocks = list(range(min(r.num_blocks for r in runners)))
        random.Random(seed).shuffle(blocks)
        self.free_blocks = blocks
        self.bs = runners[0].block_size

    def run(self, prompts: list[list[int]], new_tokens: int, chunk: int = 10**9,
            stagger: int = 0, sampling: list[SamplingConfig] | None = None,
            seq_id_base: int = 0) -> list[list[int]]:
        seqs = [dict(id=seq_id_base + i, prompt=p, out=[], computed=0, blocks=[], admitted=False,
                     start=i * stagger) for i, p in enumerate(prompts)]
        free_ids: list[int] = []
        step = 0
        while any(len(s["out"]) < new_tokens for s in seqs):
            plan, order = [], []
            for i, s in enumerate(seqs):
                if s["start"] > step or len(s["out"]) >= new_tokens:
                    continue
                prompt_len = len(s["prompt"])
                if s["computed"] < prompt_len:
                    tokens = s["prompt"][s["computed"]:s["computed"] + chunk]
                    sample = s["computed"] + len(tokens) == prompt_len
                else:
                    tokens = [s["out"][-1]]
                    sample = True
                need = -(-(s["computed"] + len(tokens)) // self.bs) - len(s["blocks"])
                new = [self.free_blocks.pop() for _ in range(need)]
                s["blocks"] += new
                plan.append(SeqStep(
                    seq_id=s["id"], token_ids=tokens, start_pos=s["computed"], new_block_ids=new,
                    sample=sample, admit=not s["admitted"],
                    sampling=(sampling[i] if sampling else SamplingConfig())
                    if not s["admitted"] else None,
                    num_generated=len(s["out"])))
                order.append(s)
                s["admitted"] = True
                s["computed"] += len(tokens)
            hidden = None
            for r in self.runners:
                hidden, sampled = r.step(plan, free_ids, hidden)
            free_ids = []
            by_id = {t.seq_id: t.token_id for t in sampled}
            assert len(by_id) == sum(p.sample for p in plan)
            for s in order:
                if s["id"] in by_id:
                    s["out"].append(by_id[s["id"]])
                    if len(s["out"]) == new_tokens:
                        free_ids.append(s["id"])
                        self.free_blocks += s["blocks"]
            step += 1
        for r in self.runners:                  # forget the finished sequences
            r.step([], free_ids, None)
        return [s["out"] for s in seqs]


def hf_greedy(model_dir, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None          # always new_tokens tokens
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


# ---- the real default model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def prompt_ids(default_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    return [tok(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(default_model_dir, prompt_ids):
    return hf_greedy(default_model_dir, prompt_ids, NEW_TOKENS)


@pytest.fixture(scope="module")
def runner(default_model_dir):
    return load_runner(default_model_dir, 0, 30, dtype=torch.float32, kv_cache_bytes=64 << 20)


def split_runners(model_dir, bounds):
    return [load_runner(model_dir, a, b, dtype=torch.float32, kv_cache_bytes=8 << 20)
            for a, b in zip(bounds, bounds[1:])]


def test_greedy_matches_hf(runner, prompt_ids, reference):
    assert Driver([runner]).run(prompt_ids, NEW_TOKENS, seq_id_base=100) == reference
    assert runner.seqs == {} and runner.sampler.seqs == {}        # all freed


@pytest.mark.parametrize("bounds", [(0, 15, 30), (0, 7, 19, 30)], ids=["2-stages", "3-stages"])
def test_pipeline_split_gives_the_same_tokens(default_model_dir, prompt_ids, reference, bounds):
    runners = split_runners(default_model_dir, bounds)
    assert [r.is_first for r in runners] == [True] + [False] * (len(runners) - 1)
    assert [r.is_last for r in runners] == [False] * (len(runners) - 1) + [True]
    out = Driver(runners).run(prompt_ids, NEW_TOKENS, chunk=7, stagger=2)
    assert out == reference


def test_batched_mixed_prefill_and_decode_equal_alone(runner, prompt_ids, reference):
    # staggered admissions: every step mixes decodes with prefill chunks of other sequences
    out = Driver([runner], seed=1).run(prompt_ids, NEW_TOKENS, chunk=6, stagger=3,
                                       seq_id_base=200)
    assert out == reference


def test_chunked_prefill_equals_one_shot(runner, prompt_ids, reference):
    for chunk in (1, 4):
        out = Driver([runner], seed=chunk).run(prompt_ids[1:], 6, chunk=chunk,
                                               seq_id_base=300 + 10 * chunk)
        assert out == [r[:6] for r in reference[1:]]


def test_seeded_sampling_does_not_depend_on_the_batch(runner, prompt_ids):
    cfg = [SamplingConfig(temperature=0.9, top_p=0.95, top_k=50, seed=1234 + i)
           for i in range(len(prompt_ids))]
    together = Driver([runner]).run(prompt_ids, 8, chunk=4, stagger=1, sampling=cfg,
                                    seq_id_base=400)
    alone = [Driver([runner], seed=5).run([p], 8, sampling=[c], seq_id_base=500 + i)[0]
             for i, (p, c) in enumerate(zip(prompt_ids, cfg))]
    assert together == alone


def test_bfloat16_stays_close_to_float32(default_model_dir, runner, prompt_ids, reference):
    bf16 = load_runner(default_model_dir, 0, 30, dtype="bfloat16", kv_cache_bytes=16 << 20)
    assert bf16.dtype_name == "bfloat16"
    out = Driver([bf16]).run(prompt_ids, 6, chunk=5, stagger=1)
    agree = sum(a == b for o, r in zip(out, reference) for a, b in zip(o, r[:6]))
    assert agree >= 0.75 * 6 * len(prompt_ids)


# ---- tiny random models of every family, logits against HF --------------------------------

def _our_logits(runner: StageRunner, ids: list[int], start: int, blocks: list[int]):
    """Logits of every row after computing ids at positions start.. (cache kept)."""
    with torch.inference_mode():
        meta = AttentionMetadata.build([start], [len(ids)], [blocks], runner.block_size,
                                       runner.device)
        x = runner.model.embed(torch.tensor(ids, device=runner.device))
        x = runner.model(x, meta, runner.kv_cache.layers)
        return runner.model.logits(x)


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2", "qwen3",
                                    "mistral-swa", "qwen2-swa", "llama-yarn", "phi3",
                                    "gemma2", "gemma3", "mixtral", "qwen3-moe"])
def test_tiny_families_match_hf_logits(tiny_model_dir, family):
    from transformers import AutoModelForCausalLM
    path = tiny_model_dir(family)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runner = load_runner(path, 0, 4, dtype=torch.float32, kv_cache_bytes=1 << 20, block_size=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (90,), generator=g).tolist()   # beyond 64: llama3 scaling kicks in
    blocks = [5, 2, 7, 1, 0, 3, 4, 6, 9, 8, 11, 10, 13, 12, 15, 14, 17, 16, 19, 18, 21, 20, 23]
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = torch.cat([_our_logits(runner, ids[:70], 0, blocks),      # prefill
                      _our_logits(runner, ids[70:85], 70, blocks)]  # chunk after cached context
                     + [_our_logits(runner, [t], 85 + i, blocks) for i, t in enumerate(ids[85:])])
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral-swa", "phi3", "gemma2",
                                    "gemma3", "mixtral", "qwen3-moe"])
def test_tiny_greedy_matches_hf_generate(tiny_model_dir, family):
    """Two stages, chunked prefill, staggered admissions: HF's greedy ids."""
    path = tiny_model_dir(family)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(10, 40))]
    reference = hf_greedy(path, prompts, 20)
    runners = split_runners(path, (0, 1, 4))
    assert Driver(runners).run(prompts, 20, chunk=4, stagger=1) == reference


def test_admission_after_a_cached_prefix_reuses_its_blocks(tiny_model_dir):
    """A prefix-cache hit: B is admitted at start_pos 8 onto A's first two full blocks."""
    path = tiny_model_dir("llama")
    a_prompt, b_prompt = list(range(1, 15)), list(range(1, 9)) + [50, 51, 52, 53, 54]
    reference = hf_greedy(path, [b_prompt], 10)[0]
    r = load_runner(path, 0, 4, dtype=torch.float32, kv_cache_bytes=1 << 20, block_size=4)
    r.step([SeqStep(1, a_prompt, 0, [3, 7, 1, 9], True, admit=True)], [], None)
    _, out = r.step([SeqStep(2, b_prompt[8:], 8, [3, 7, 4, 5], True, admit=True)], [1], None)
    tokens = [out[0].token_id]
    for i in range(9):
        pos = len(b_prompt) + i
        new_blocks = [6 + pos // 4] if pos % 4 == 0 else []     # a new block every 4 positions
        _, out = r.step([SeqStep(2, [tokens[-1]], pos, new_blocks, True, num_generated=i + 1)],
                        [], None)
        tokens.append(out[0].token_id)
    assert tokens == reference


def test_gemma3_multimodal_checkpoint_serves_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (model_type gemma3: text_config, weights
    under language_model.): its text logits equal HF's for a text-only sequence."""
    import transformers
    config = transformers.Gemma3Config(
        text_config=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                         head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                         sliding_window_pattern=2, max_position_embeddings=512),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.15)
    hf.save_pretrained(tmp_path)
    runner = load_runner(tmp_path, 0, 4, dtype=torch.float32, kv_cache_bytes=1 << 20,
                         block_size=4)
    ids = torch.randint(0, 250, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([ids])).logits[0]
    ours = _our_logits(runner, ids, 0, list(range(10)))
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_longrope_short_and_long_factors_as_hf(tiny_model_dir):
    """LongRoPE (Phi-3): a sequence up to original_max_position_embeddings (32) takes the
    short factors, a longer one the long factors (rope_long on admission): HF's logits."""
    from transformers import AutoModelForCausalLM
    path = tiny_model_dir("phi3-longrope")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runner = load_runner(path, 0, 4, dtype=torch.float32, kv_cache_bytes=1 << 20, block_size=4)
    assert runner.config.rope_long_after == 32
    ids = torch.randint(0, 128, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    for seq_id, n, long in ((1, 30, False), (2, 60, True)):
        with torch.inference_mode():
            ref = hf(torch.tensor([ids[:n]])).logits[0]
        sampled = []
        blocks = list(range(16 * seq_id, 16 * seq_id + 16))
        # prefill in two chunks, then decodes, all with the mode given on admission
        runner.step([SeqStep(seq_id, ids[:n - 6], 0, blocks, True, admit=True,
                             rope_long=long)], [], None)
        for i in range(n - 6, n):
            _, out = runner.step([SeqStep(seq_id, [ids[i]], i, [], True)], [], None)
            sampled.append(out[0].token_id)
        assert sampled == ref[n - 6:].argmax(-1).tolist()
        with torch.inference_mode():
            meta = AttentionMetadata.build([0], [n], [blocks], 4, runner.device)
            if long:
                meta.rope_positions = meta.positions + runner.config.max_position_embeddings
            x = runner.model(runner.model.embed(torch.tensor(ids[:n])), meta,
                             runner.kv_cache.layers)
            torch.testing.assert_close(runner.model.logits(x), ref, atol=2e-4, rtol=1e-4)
        runner.step([], [seq_id], None)
    # the long factors differ from the short ones: the wrong mode gives other logits
    with torch.inference_mode():
        meta = AttentionMetadata.build([0], [60], [list(range(16))], 4, runner.device)
        x = runner.model(runner.model.embed(torch.tensor(ids)), meta, runner.kv_cache.layers)
        assert (runner.model.logits(x) - hf(torch.tensor([ids])).logits[0]).abs().max() > 1e-2
