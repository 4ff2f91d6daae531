"""resolve_model: the default alias (GGUF from PyPI, converted once), local dirs, GGUF, hub ids."""
from __future__ import annotations

import json
import pathlib
import threading
import time

import pytest

from shardline.common import model_source as loader
from shardline.common.model_source import DEFAULT_MODEL, default_cache_dir, resolve_model


def test_default_model_is_a_complete_hf_directory(default_model_dir):
    from safetensors import safe_open
    from transformers import AutoTokenizer
    d = pathlib.Path(default_model_dir)
    assert d.name == DEFAULT_MODEL
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert (d / "generation_config.json").is_file()
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in names and len(names) == 272          # tied embeddings
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    # a second call finds the cached conversion
    again = resolve_model(DEFAULT_MODEL, str(d.parent))
    assert again == d


def test_local_directory_is_used_as_is(tiny_model_dir):
    d = tiny_model_dir("llama")
    assert resolve_model(str(d)) == d.resolve()


def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError):
        resolve_model("./no/such/model")


def test_hub_ids_use_snapshot_download(monkeypatch, tmp_path):
    import huggingface_hub
    calls = []

    def fake(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        (tmp_path / "model.safetensors").write_bytes(b"")
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == tmp_path
    assert calls[0][0] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "*.safetensors" in calls[0][1] and "*.json" in calls[0][1]


def test_cache_dir_comes_from_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDLINE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("SHARDLINE_CACHE")
    assert default_cache_dir() == pathlib.Path.home() / ".cache/shardline/models"


def test_gguf_is_converted_once_even_by_concurrent_callers(monkeypatch, tmp_path):
    gguf = tmp_path / "tiny.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    conversions = []

    def fake_convert(src, out):
        conversions.append(src)
        time.sleep(0.2)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(loader, "convert_gguf", fake_convert)
    cache = tmp_path / "cache"
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model(str(gguf), str(cache))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert conversions == [gguf] and set(results) == {cache / "tiny.Q8_0"}
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.Q8_0", "tiny.Q8_0.lock"]
