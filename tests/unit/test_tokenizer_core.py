"""TokenizerCore and TokenizerConfig on the default model's tokenizer (SmolLM2, byte-level BPE)."""
from __future__ import annotations

import argparse
import json
import os

import pytest
from transformers import AutoTokenizer

from shardline.common.server import InvalidArgument
from shardline.tokenizer.config import TokenizerConfig
from shardline.tokenizer.core import DetokenizeItem, TokenizerCore

# Multi-byte characters (accents, CJK, emoji incl. ZWJ sequences and a flag) that byte-level BPE
# splits across tokens, runs of spaces at token starts, newlines and tabs.
TEXT = ("Héllo, wörld! 世界你好 — naïve café 🦄👍🏽 👨‍👩‍👧 🇫🇷  two  spaces\n"
        "\tindented: ça coûte 3€. Ελληνικά, русский, العربية, 日本語のテキスト。 end 🎉")


@pytest.fixture(scope="module")
def model_dir():
    from shardline.common.model_source import DEFAULT_MODEL, resolve_model
    return resolve_model(DEFAULT_MODEL, os.environ.get("SHARDLINE_CACHE"))


@pytest.fixture(scope="module")
def core(model_dir):
    return TokenizerCore.from_dir(model_dir, name="smollm2")


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoTokenizer.from_pretrained(str(model_dir))


def stream(core, ids, chunk=1, skip=True):
    """Detokenize ids as a client would: a few new ids per call, only ids[prefix:] sent."""
    prefix = read = 0
    deltas, sent = [], []
    for end in range(chunk, len(ids) + chunk, chunk):
        window = ids[prefix:min(end, len(ids))]
        sent.append(len(window))
        (r,) = core.detokenize([DetokenizeItem(window, read - prefix, skip)])
        deltas.append(r.text)
        prefix, read = prefix + r.prefix_advance, prefix + r.read_offset   # both relative to the window
    return deltas, sent


# --- Tokenize ----------------------------------------------------------------------------------

def test_tokenize_batch_matches_single_calls(core, hf):
    texts = [TEXT, "", "hello world", " leading space"]
    for add in (False, True):
        assert core.tokenize(texts, add_special_tokens=add) == [
            hf(t, add_special_tokens=add)["input_ids"] for t in texts]


def test_tokenize_empty_batch(core):
    assert core.tokenize([]) == []


def test_tokenize_rejects_non_str(core):
    with pytest.raises(InvalidArgument, match=r"texts\[1\]"):
        core.tokenize(["a", 3])


# --- Chat template -----------------------------------------------------------------------------

def test_chat_template_renders_and_tokenizes(core, hf):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}]
    p = core.apply_chat_template(msgs, add_generation_prompt=True)
    assert p.text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                      "<|im_start|>user\nHi 👋<|im_end|>\n<|im_start|>assistant\n")
    expected = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert p.token_ids == list(getattr(expected, "input_ids", expected))
    assert core.decode(p.token_ids, skip_special_tokens=False) == p.text


def test_chat_template_without_generation_prompt(core):
    p = core.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False)
    assert p.text.endswith("<|im_start|>user\nx<|im_end|>\n")


def test_chat_template_tool_role_allowed(core):
    p = core.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                  {"role": "tool", "content": "42"}])
    assert "<|im_start|>tool\n42<|im_end|>" in p.text


@pytest.mark.parametrize("msgs, match", [
    ([], "must not be empty"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role is 'robot'"),
    ([{"role": "user", "content": "x"}, {"role": "", "content": "y"}], r"messages\[1\]\.role"),
])
def test_chat_template_rejects_bad_messages(core, msgs, match):
    with pytest.raises(InvalidArgument, match=match):
        core.apply_chat_template(msgs)


def test_chat_template_missing(model_dir):
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = None
    bare = TokenizerCore(tok, name="bare")
    assert not bare.info().has_chat_template
    with pytest.raises(InvalidArgument, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


# --- Detokenize --------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
@pytest.mark.parametrize("skip", [True, False])
def test_stream_deltas_concatenate_to_decode(core, hf, chunk, skip):
    ids = core.tokenize([TEXT])[0]
    im_end, im_start = hf.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    ids = ids[:20] + [im_end, im_start] + ids[20:] + [im_end]   # special tokens inside and at the end
    deltas, sent = stream(core, ids, chunk, skip)
    expected = hf.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == expected == core.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)
    assert max(sent) <= (8 if chunk == 1 else len(ids) // 2)   # only a short window is decoded


def test_incomplete_character_waits(core):
    ids = core.tokenize(["🦄"])[0]
    assert len(ids) > 1                  # split across byte-level tokens
    (r,) = core.detokenize([DetokenizeItem(ids[:-1], 0)])
    assert (r.text, r.prefix_advance, r.read_offset) == ("", 0, 0)
    (r,) = core.detokenize([DetokenizeItem(ids, 0)])
    assert (r.text, r.prefix_advance, r.read_offset) == ("🦄", 0, len(ids))


def test_offsets_follow_the_proto(core):
    ids = core.tokenize(["Hello there, general"])[0]
    (r,) = core.detokenize([DetokenizeItem(ids, 2)])
    assert r.text == core.decode(ids)[len(core.decode(ids[:2])):]
    assert (r.prefix_advance, r.read_offset) == (2, len(ids))
    (r,) = core.detokenize([DetokenizeItem(ids, len(ids))])   # nothing new
    assert (r.text, r.prefix_advance, r.read_offset) == ("", 0, len(ids))


def test_batch_equals_single_items(core, hf):
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    seqs = [core.tokenize([t])[0] for t in (TEXT, "日本語", " a b", "🇫🇷🇫🇷")]
    items = [DetokenizeItem(seqs[0][:9], 4, True), DetokenizeItem(seqs[1], 0, False),
             DetokenizeItem(seqs[2] + [im_end], 1, False), DetokenizeItem(seqs[3][:-1], 0, True),
             DetokenizeItem([], 0, True), DetokenizeItem(seqs[2] + [im_end], 3, True)]
    batched = core.detokenize(items)
    assert batched == [core.detokenize([it])[0] for it in items]
    assert batched[2].text.endswith("<|im_end|>") and batched[5].text == ""
    assert core.detokenize([]) == []


@pytest.mark.parametrize("item, match", [
    (DetokenizeItem([1, 2], 3), "read_offset 3 outside"),
    (DetokenizeItem([1, 2], -1), "read_offset -1 outside"),
    (DetokenizeItem([1, -5], 0), "token id outside"),
    (DetokenizeItem([1, 10**7], 0), "token id outside"),
])
def test_detokenize_rejects_bad_items(core, item, match):
    with pytest.raises(InvalidArgument, match=match):
        core.detokenize([DetokenizeItem([5], 0), item])


# --- Info --------------------------------------------------------------------------------------

def test_info(core, hf):
    info = core.info()
    assert info.vocab_size == len(hf) == 49152
    assert hf.convert_tokens_to_ids("<|im_end|>") in info.eos_token_ids
    assert info.bos_token_id == (-1 if hf.bos_token_id is None else hf.bos_token_id)
    assert info.has_chat_template and info.name == "smollm2"


def test_generation_config_eos_ids_are_added(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [hf.eos_token_id, 0]}))
    info = TokenizerCore.from_dir(tmp_path).info()
    assert info.eos_token_ids == [hf.eos_token_id, 0]
    assert info.name == str(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert TokenizerCore.from_dir(tmp_path).info().eos_token_ids == [hf.eos_token_id, 7]


# --- Config ------------------------------------------------------------------------------------

def test_config_defaults_and_validation():
    cfg = TokenizerConfig(model="m", log_level="debug")
    assert (cfg.port, cfg.host, cfg.log_level) == (50052, "0.0.0.0", "DEBUG")
    for bad in (dict(model=""), dict(model="m", port=70000), dict(model="m", port=-1),
                dict(model="m", host=""), dict(model="m", log_level="LOUD")):
        with pytest.raises(ValueError):
            TokenizerConfig(**bad)


def test_config_from_args(monkeypatch):
    from shardline.common.model_source import DEFAULT_MODEL
    monkeypatch.setenv("SHARDLINE_CACHE", "/cache")
    p = argparse.ArgumentParser()
    TokenizerConfig.add_args(p)
    cfg = TokenizerConfig.from_args(p.parse_args(["--model", "/m", "--port", "0", "--log-level", "warning"]))
    assert (cfg.model, cfg.port, cfg.host, cfg.log_level, cfg.cache_dir) == ("/m", 0, "0.0.0.0", "WARNING", "/cache")
    assert TokenizerConfig.from_args(p.parse_args([])).model == DEFAULT_MODEL
