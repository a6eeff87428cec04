"""Offline model cache: fetched once per machine, resolvable by name, deterministic greedy output."""

from __future__ import annotations

import json

import pytest

from toushi.models import MARKER, ModelError, fetch, list_cached, resolve_model


def test_fetch_is_cached(offline_model, monkeypatch):
    assert (offline_model / "model.safetensors").exists() and (offline_model / MARKER).exists()
    info = json.loads((offline_model / MARKER).read_text())
    assert info["gguf_sha256"].startswith("b179c952")

    def no_download(*a, **k):
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr("toushi.models._download_gguf", no_download)
    assert fetch("smollm2-135m-instruct") == offline_model
    assert {r["name"] for r in list_cached()} >= {"smollm2-135m-instruct"}


def test_resolve_references(offline_model, tmp_path):
    assert resolve_model("smollm2-135m-instruct") == str(offline_model)
    assert resolve_model(str(offline_model)) == str(offline_model)
    assert resolve_model("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
    with pytest.raises(ModelError, match="unknown model 'nonsense'"):
        resolve_model("nonsense")
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_unwritable_cache_dir_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "home").write_text("a file, not a directory")
    monkeypatch.setenv("TOUSHI_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelError, match="not writable.*TOUSHI_HOME"):
        resolve_model("smollm2-135m-instruct")


def test_greedy_generation_is_real_and_deterministic(offline_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(offline_model)
    model = AutoModelForCausalLM.from_pretrained(offline_model)
    msgs = [{"role": "user", "content": "I failed my driving test today and feel stupid."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    outs = []
    for _ in range(2):
        with torch.no_grad():
            o = model.generate(**enc, max_new_tokens=24, do_sample=False)
        outs.append(tok.decode(o[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    assert outs[0] == outs[1]
    assert len(outs[0].split()) >= 5  # a real model says something, a broken conversion says nothing


def test_tiny_model_has_two_layers_and_same_tokenizer(tiny_model, offline_model):
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(tiny_model).num_hidden_layers == 2
    a, b = AutoTokenizer.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(offline_model)
    assert a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template


def test_gguf_tensor_name_map_is_built_once_during_a_conversion():
    """transformers' GGUF loader asks gguf for the tensor-name map once per submodule; during toushi's conversion
    it is built once (the same object back), and gguf's own function is back afterwards."""
    import gguf

    from toushi.models import _tensor_name_map_built_once

    build = gguf.get_tensor_name_map
    arch = gguf.MODEL_ARCH.LLAMA
    with _tensor_name_map_built_once():
        first = gguf.get_tensor_name_map(arch, 30)
        assert gguf.get_tensor_name_map(arch, 30) is first
        assert gguf.get_tensor_name_map(arch, 2) is not first  # another layer count is another map
    assert gguf.get_tensor_name_map is build and build(arch, 30) is not build(arch, 30)
