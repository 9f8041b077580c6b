"""HF export: reads back identically through hf_loader, and runs in transformers."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
from fixtures_model import load_default_checkpoint, write_tiny_gguf
from hf_reference import load_reference_model

from pdserve.engine.export import export_hf_dir
from pdserve.engine.loader import Checkpoint, load_checkpoint


@functools.lru_cache(maxsize=1)
def _exported_default() -> Path:
    # One float32 export of the default model per session (~0.5 GB, removed at exit).
    directory = Path(tempfile.mkdtemp(prefix="pdserve-export-test-"))
    import atexit
    import shutil

    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return export_hf_dir(load_default_checkpoint(), directory / "SmolLM2-135M-Instruct")


def _assert_same_model(original: Checkpoint, loaded: Checkpoint) -> None:
    assert loaded.architecture == original.architecture
    assert loaded.architecture.rope_scaling == original.architecture.rope_scaling
    assert loaded.weights.keys() == original.weights.keys()
    for name, weight in original.weights.items():
        assert torch.equal(loaded.weights[name], weight), name
    assert loaded.bos_token_id == original.bos_token_id
    assert loaded.eos_token_ids == original.eos_token_ids
    assert json.loads(loaded.tokenizer.to_hf_json()) == json.loads(original.tokenizer.to_hf_json())
    assert loaded.tokenizer.chat_template == original.tokenizer.chat_template
    assert (
        loaded.tokenizer.config.special_tokens_map()
        == original.tokenizer.config.special_tokens_map()
    )


def test_export_roundtrips_through_hf_loader() -> None:
    original = load_default_checkpoint()
    exported = _exported_default()
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    loaded = load_checkpoint(str(exported), show_progress=False)
    _assert_same_model(original, loaded)
    assert loaded.model_name == "SmolLM2-135M-Instruct"
    text = "Héllo 👋 <|im_start|>wörld 42"
    assert loaded.tokenizer.encode(text) == original.tokenizer.encode(text)
    # Same file bytes, same digest; a second load does not change it.
    assert (
        loaded.weights_digest == load_checkpoint(str(exported), show_progress=False).weights_digest
    )


def test_export_runs_in_transformers_with_reference_logits() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = load_default_checkpoint()
    exported = _exported_default()
    model = AutoModelForCausalLM.from_pretrained(
        exported, dtype=torch.float32, attn_implementation="eager"
    )
    tokenizer = AutoTokenizer.from_pretrained(exported)
    messages = [{"role": "user", "content": "Name three colors."}]
    prompt = checkpoint.tokenizer.apply_chat_template(messages)
    assert (
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        == prompt
    )
    prompt_ids = checkpoint.tokenizer.encode(prompt)
    assert tokenizer(prompt)["input_ids"] == prompt_ids
    assert model.generation_config.eos_token_id == 2
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids])).logits
        reference_logits = load_reference_model()(torch.tensor([prompt_ids])).logits
    assert torch.equal(logits, reference_logits)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_export_in_lower_precision(tmp_path: Path, dtype: str) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    original = load_checkpoint(str(tmp_path / "tiny.gguf"), show_progress=False)
    exported = export_hf_dir(original, tmp_path / "hf", dtype=dtype)
    config = json.loads((exported / "config.json").read_text())
    assert config["torch_dtype"] == dtype and not config["tie_word_embeddings"]
    loaded = load_checkpoint(str(exported), show_progress=False)
    assert "lm_head.weight" in loaded.weights
    for name, weight in original.weights.items():
        assert torch.equal(loaded.weights[name], weight.to(getattr(torch, dtype)).float()), name


def test_export_rejects_unknown_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        export_hf_dir(load_default_checkpoint(), tmp_path, dtype="int8")


def test_hf_dir_add_bos_token_flag_is_honored(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    exported = export_hf_dir(
        load_checkpoint(str(tmp_path / "tiny.gguf"), show_progress=False), tmp_path / "hf"
    )
    config_path = exported / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    assert config["add_bos_token"] is False
    config["add_bos_token"] = True
    config_path.write_text(json.dumps(config))
    tokenizer = load_checkpoint(str(exported), show_progress=False).tokenizer
    assert tokenizer.encode("hello") == [tokenizer.bos_token_id, tokenizer.token_to_id("hello")]
    assert tokenizer.encode("hello", add_special_tokens=False) == [tokenizer.token_to_id("hello")]
