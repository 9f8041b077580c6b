"""The planner's hardware and model catalogues: shipped data, user overrides, malformed files."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from pdserve.planner.catalogue.hardware import FIGURES, Accelerator, load_hardware_catalogue
from pdserve.planner.catalogue.models import ModelSpec, load_model_catalogue, model_from_config_json
from pdserve.planner.cost.roofline import Efficiency, RooflineCostModel

REQUIRED_ACCELERATORS = {"H200", "H100-SXM", "A100-80GB", "A100-40GB", "L40S", "L4", "A10G", "T4", "MI300X"}
REQUIRED_MODELS = {
    "SmolLM2-135M", "Llama-3.1-8B", "Llama-3.1-70B", "Qwen2.5-7B", "Qwen2.5-32B", "Qwen2.5-72B",
    "Mistral-7B-v0.3",
}


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def full_entry() -> dict[str, Any]:
    return {
        "vendor": "NVIDIA",
        "description": "RTX 4090 24 GB",
        "flops_dtype": "bf16",
        "peak_flops_per_s": {"value": 165.2e12, "verified": True},
        "memory_bytes_per_s": 1.008e12,
        "memory_bytes": 24e9,
        "intra_node_link": "PCIe 4.0 x16",
        "intra_node_bytes_per_s": 32e9,
        "network_bytes_per_s": 1.25e9,
        "gpus_per_node": 4,
        "price": {"usd_per_gpu_hour": 0.5, "provider": "me", "page": "https://example.org",
                  "date": "2026-11-29", "verified": True},
    }


def test_data_files_ship_inside_the_package() -> None:
    data = resources.files("pdserve.planner") / "data"
    assert (data / "hardware.json").is_file()
    assert (data / "models.json").is_file()


def test_shipped_hardware_catalogue() -> None:
    catalogue = load_hardware_catalogue()
    assert set(catalogue) >= REQUIRED_ACCELERATORS
    h100 = catalogue["H100-SXM"]
    assert h100.peak_flops_per_s == 989.4e12  # dense; the datasheet's 1,979 is with sparsity
    assert h100.memory_bytes_per_s == 3.35e12
    assert h100.memory_bytes == 80e9
    assert h100.intra_node_bytes_per_s == 450e9  # 900 GB/s NVLink is both directions together
    assert catalogue["H200"].memory_bytes == 141e9
    assert catalogue["MI300X"].peak_flops_per_s == 1307.4e12
    assert catalogue["T4"].flops_dtype == "fp16"  # no bf16 on Turing
    for name, accelerator in catalogue.items():
        # A sparsity figure slipped in would exceed every dense peak here.
        assert 1e13 < accelerator.peak_flops_per_s < 1.5e15, name
        assert 1e11 < accelerator.memory_bytes_per_s < 1e13, name
        assert 1e10 <= accelerator.memory_bytes <= 2e11, name
        assert accelerator.sources, name
        price = accelerator.price
        assert price is not None, name
        assert 0.1 < price.usd_per_gpu_hour < 20, name
        assert price.provider and price.page.startswith("https://"), name
        assert re.match(r"^\d{4}-\d{2}(-\d{2})?$", price.date), name


def test_unchecked_figures_are_flagged() -> None:
    catalogue = load_hardware_catalogue()
    assert not catalogue["A10G"].is_verified("peak_flops_per_s")  # no A10G datasheet exists
    assert catalogue["A10G"].is_verified("memory_bytes_per_s")
    assert catalogue["H100-SXM"].is_verified("peak_flops_per_s")
    assert not catalogue["MI300X"].is_verified("intra_node_bytes_per_s")
    # None of the shipped prices was read on the provider's own page.
    assert not any(a.price and a.price.verified for a in catalogue.values())
    with pytest.raises(KeyError):
        catalogue["L4"].is_verified("price")


def test_measured_cpu_entry_reproduces_the_readme_decode_cap() -> None:
    cpu = Accelerator.measured("this-cpu", peak_flops_per_s=2e11, memory_bytes_per_s=25.8e9,
                               memory_bytes=24e9)
    assert cpu.unverified == frozenset()
    assert all(cpu.is_verified(figure) for figure in FIGURES)
    assert cpu.gpus_per_node == 1 and cpu.network_bytes_per_s is None
    smol = load_model_catalogue()["SmolLM2-135M"]
    cost = RooflineCostModel(smol, cpu, dtype="float32",
                             efficiency=Efficiency(compute=1.0, bandwidth=1.0, step_overhead_s=0.0))
    # README: 25.8 GB/s copy bandwidth caps batch-1 decode of 538 MB of fp32 weights at 48 tok/s.
    # Matmul weights: (30 * 3,538,944 + 49,152 * 576) * 4 B = 537,919,488 B (+ 46,080 B of KV).
    assert 1 / cost.decode_step_seconds(1, 1) == pytest.approx(25.8e9 / 537_965_568, rel=1e-9)
    assert 47.5 < 1 / cost.decode_step_seconds(1, 1) < 48.5
    with pytest.raises(ValueError, match="memory_bytes_per_s"):
        Accelerator.measured("bad", peak_flops_per_s=1e9, memory_bytes_per_s=0.0, memory_bytes=1e9)


def test_user_file_overrides_fields_and_adds_entries(tmp_path: Path) -> None:
    user = write_json(tmp_path / "hw.json", {"accelerators": {
        "H100-SXM": {"price": {"usd_per_gpu_hour": 1.99, "provider": "my cloud",
                               "page": "https://example.org/pricing", "date": "2026-11",
                               "verified": True}},
        "RTX-4090": full_entry(),
    }})
    catalogue = load_hardware_catalogue(user)
    h100 = catalogue["H100-SXM"]
    assert h100.price is not None and h100.price.usd_per_gpu_hour == 1.99 and h100.price.verified
    assert h100.peak_flops_per_s == 989.4e12  # fields the file does not name are kept
    new = catalogue["RTX-4090"]
    assert new.peak_flops_per_s == 165.2e12 and new.gpus_per_node == 4
    assert new.is_verified("peak_flops_per_s")
    assert not new.is_verified("memory_bytes_per_s")  # a bare number is not a checked figure
    assert set(catalogue) >= REQUIRED_ACCELERATORS
    shipped_price = load_hardware_catalogue()["H100-SXM"].price
    assert shipped_price is not None and shipped_price.usd_per_gpu_hour != 1.99


def _without(entry: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != key}


MALFORMED_HARDWARE: list[tuple[Any, str]] = [
    ({"accelerators": {"X": _without(full_entry(), "memory_bytes")}}, "missing field 'memory_bytes'"),
    ({"accelerators": {"X": {**full_entry(), "memory_bytes": -1}}}, "'memory_bytes' must be finite and > 0"),
    ({"accelerators": {"X": {**full_entry(), "memory_bytes": "80GB"}}}, "'memory_bytes' must be a number"),
    ({"accelerators": {"X": {**full_entry(), "peak_flop_per_s": 1e12}}}, r"unknown fields \['peak_flop_per_s'\]"),
    ({"accelerators": {"X": {**full_entry(), "flops_dtype": "int4"}}}, "flops_dtype must be one of"),
    ({"accelerators": {"X": {**full_entry(), "gpus_per_node": 2.5}}}, "gpus_per_node must be a whole number"),
    ({"accelerators": {"X": {**full_entry(), "peak_flops_per_s": {"verified": True}}}}, "must be a number or"),
    ({"accelerators": {"X": {**full_entry(), "price": {**full_entry()["price"], "date": "last May"}}}},
     "date must be YYYY-MM-DD"),
    ({"accelerators": {"H100-SXM": {"price": {"usd_per_gpu_hour": 2.0}}}}, "missing field 'provider'"),
    ({"accelerators": {"X": "H100"}}, "entry 'X' must be an object"),
    ({"gpus": {}}, "unknown top-level keys"),
    ([1, 2, 3], "expected a JSON object"),
]


@pytest.mark.parametrize("content,message", MALFORMED_HARDWARE)
def test_malformed_hardware_files_raise_clear_errors(tmp_path: Path, content: Any, message: str) -> None:
    user = write_json(tmp_path / "hw.json", content)
    with pytest.raises(ValueError, match=message) as error:
        load_hardware_catalogue(user)
    assert str(user) in str(error.value)


def test_unreadable_or_invalid_json_raises_value_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"accelerators": {', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hardware_catalogue(broken)
    with pytest.raises(ValueError, match="cannot read"):
        load_hardware_catalogue(tmp_path / "missing.json")


@pytest.mark.parametrize("name", sorted(REQUIRED_MODELS))
def test_catalogue_params_within_3_percent_of_published_totals(name: str) -> None:
    model = load_model_catalogue()[name]
    assert model.stated_params is not None
    assert abs(model.params() - model.stated_params) / model.stated_params < 0.03
    model.check_stated_params()


def test_model_params_by_hand() -> None:
    models = load_model_catalogue()
    # SmolLM2-135M: per layer q,o 2*576*576 + k,v 2*576*192 + MLP 3*576*1536 + 2 norms * 576
    # = 3,540,096; * 30 + tied embedding 49,152*576 + final norm 576 = 134,515,008.
    assert models["SmolLM2-135M"].params() == 134_515_008
    # Llama-3.1-8B: 32 * (41,943,040 + 176,160,768 + 8,192) + 2 * 128,256*4096 + 4096.
    assert models["Llama-3.1-8B"].params() == 8_030_261_248
    # Qwen2.5-7B carries q/k/v biases: (28 + 2*4) * 128 = 4,608 per layer.
    qwen = models["Qwen2.5-7B"]
    assert qwen.params() - ModelSpec(**{**qwen.__dict__, "attention_bias": False}).params() == 28 * 4_608
    wrong = ModelSpec(**{**models["Llama-3.1-8B"].__dict__, "intermediate_size": 28672})
    with pytest.raises(ValueError, match="a shape is probably wrong"):
        wrong.check_stated_params()


def test_model_from_config_json(tmp_path: Path) -> None:
    smol_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_attention_heads": 9, "num_hidden_layers": 30,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
    }
    model_dir = tmp_path / "SmolLM2-135M"
    model_dir.mkdir()
    spec = model_from_config_json(write_json(model_dir / "config.json", smol_config))
    shipped = load_model_catalogue()["SmolLM2-135M"]
    assert spec.name == "SmolLM2-135M"  # from the directory when the config has no name
    assert spec.head_dim == 64  # hidden / heads when the config has no head_dim
    assert spec.params() == shipped.params() == 134_515_008
    assert spec.kv_bytes_per_token("bfloat16") == shipped.kv_bytes_per_token("bfloat16") == 23_040
    assert not spec.attention_bias

    qwen_config = {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "tie_word_embeddings": False,
    }
    qwen = model_from_config_json(write_json(tmp_path / "qwen.json", qwen_config), name="qwen")
    assert qwen.attention_bias and qwen.params() == load_model_catalogue()["Qwen2.5-7B"].params()

    with pytest.raises(ValueError, match="'intermediate_size'"):
        model_from_config_json(write_json(tmp_path / "a.json", _without(smol_config, "intermediate_size")))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        model_from_config_json(write_json(tmp_path / "b.json", {**smol_config, "num_local_experts": 8}))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        model_from_config_json(write_json(tmp_path / "c.json", {**smol_config, "num_key_value_heads": 4}))
    with pytest.raises(ValueError, match="cannot read"):
        model_from_config_json(tmp_path / "nope.json")


def test_model_catalogue_user_file(tmp_path: Path) -> None:
    tiny = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
            "intermediate_size": 128, "vocab_size": 256, "tie_word_embeddings": True}
    user = write_json(tmp_path / "models.json", {"models": {
        "tiny": tiny,
        "Llama-3.1-8B": {"stated_params": 8_000_000_000},
    }})
    models = load_model_catalogue(user)
    assert models["tiny"].params() == 90_432
    assert models["Llama-3.1-8B"].stated_params == 8_000_000_000
    assert models["Llama-3.1-8B"].num_layers == 32
    assert set(models) >= REQUIRED_MODELS
    bad = write_json(tmp_path / "bad.json", {"models": {"tiny": {**tiny, "num_heads": 5}}})
    with pytest.raises(ValueError, match="bad.json: model 'tiny'.*multiple of num_kv_heads"):
        load_model_catalogue(bad)
    bad_type = write_json(tmp_path / "bad2.json", {"models": {"tiny": {**tiny, "num_layers": 2.0}}})
    with pytest.raises(ValueError, match="'num_layers' must be a positive integer"):
        load_model_catalogue(bad_type)
