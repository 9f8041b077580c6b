"""The Hugging Face reference: transformers' own Llama, built by transformers from the default GGUF.

Parity tests compare pdserve against it. transformers' GGUF path is slow (~25 s: it parses the
file twice and dequantizes in numpy), so by default its result is kept under
``envs.cache_dir()/reference/``: the model as transformers built it (float32 safetensors), its
tokenizer, and greedy runs. Every cache key includes the GGUF file's sha256 and the transformers
and torch versions, so a different file or library never reuses a stale result. Pass
``use_cache=False`` to recompute everything from the GGUF.

Not a test module: import it (``from hf_reference import reference_greedy``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pdserve import envs
from pdserve.engine.loader.model_files import resolve_model_path


@dataclass(frozen=True)
class ReferenceResult:
    """A greedy continuation and, per step, how far the top logit led the runner-up."""

    token_ids: list[int]
    top2_gaps: list[float]
    """top2_gaps[i] = logits[top1] - logits[top2] at step i; a near-tie (< 1e-3) may flip under
    a different but correct kernel, so parity tests accept divergence only there."""


def reference_gguf_path() -> Path:
    """The GGUF the reference is built from: the default model (or PDSERVE_MODEL, if a GGUF)."""
    path = resolve_model_path(None, show_progress=False)
    if path.is_dir():
        raise ValueError(
            f"the HF reference is built from a GGUF file, but the default model is {path}"
        )
    return path


@functools.lru_cache(maxsize=4)
def _file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(8 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def _cache_tag() -> str:
    import transformers

    digest = _file_sha256(reference_gguf_path())
    return f"{digest[:16]}-transformers{transformers.__version__}-torch{torch.__version__}"


def _reference_dir() -> Path:
    return envs.cache_dir() / "reference"


def load_reference_model(use_cache: bool = True) -> Any:
    """transformers' LlamaForCausalLM from the default GGUF: float32, eager attention, eval mode.
    One instance per process (per ``use_cache`` value)."""
    return _load_reference_model(bool(use_cache))


@functools.lru_cache(maxsize=2)
def _load_reference_model(use_cache: bool) -> Any:
    from transformers import LlamaForCausalLM

    cached = _reference_dir() / f"model-{_cache_tag()}"
    if use_cache and (cached / "config.json").exists():
        model = LlamaForCausalLM.from_pretrained(
            cached, dtype=torch.float32, attn_implementation="eager"
        )
    else:
        gguf = reference_gguf_path()
        model = LlamaForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
        )
        if use_cache:
            _save_model(model, cached)
    return model.eval()


def _save_model(model: Any, directory: Path) -> None:
    # save_pretrained refuses GGUF-quantized models; the weights are plain float32 by now, so
    # write them and the config (minus the GGUF marker) the way from_pretrained reads them.
    from safetensors.torch import save_file

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    tensors = {
        name: tensor.contiguous()
        for name, tensor in model.state_dict().items()
        if not (name == "lm_head.weight" and model.config.tie_word_embeddings)
    }
    with _atomic_dir(directory) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=1))
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})


def load_reference_tokenizer(use_cache: bool = True) -> Any:
    """transformers' tokenizer built from the default GGUF's metadata (AutoTokenizer, gguf_file=)."""
    return _load_reference_tokenizer(bool(use_cache))


@functools.lru_cache(maxsize=2)
def _load_reference_tokenizer(use_cache: bool) -> Any:
    from transformers import AutoTokenizer

    cached = _reference_dir() / f"tokenizer-{_cache_tag()}"
    if use_cache and (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    gguf = reference_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if use_cache:
        with _atomic_dir(cached) as staging:
            tokenizer.save_pretrained(staging)
    return tokenizer


def reference_greedy(
    prompt_ids: list[int], max_new_tokens: int, use_cache: bool = True
) -> ReferenceResult:
    """Greedy decoding with the reference model and its KV cache: exactly ``max_new_tokens`` ids
    (EOS is not special here), and the top-2 logit gap at every step."""
    key = json.dumps([_cache_tag(), list(prompt_ids), max_new_tokens])
    cached = _reference_dir() / f"greedy-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    if use_cache and cached.exists():
        data = json.loads(cached.read_text())
        return ReferenceResult(token_ids=data["token_ids"], top2_gaps=data["top2_gaps"])
    result = run_greedy(load_reference_model(use_cache), prompt_ids, max_new_tokens)
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(
            json.dumps({"token_ids": result.token_ids, "top2_gaps": result.top2_gaps})
        )
        os.replace(partial, cached)
    return result


def run_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int) -> ReferenceResult:
    """The greedy loop itself: prefill the prompt, then one token per step through the KV cache."""
    token_ids: list[int] = []
    gaps: list[float] = []
    with torch.inference_mode():
        output = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        for step in range(max_new_tokens):
            logits = output.logits[0, -1]  # [vocab_size]
            top2 = torch.topk(logits, 2)
            next_id = int(top2.indices[0])
            token_ids.append(next_id)
            gaps.append(float(top2.values[0] - top2.values[1]))
            if step + 1 < max_new_tokens:
                output = model(
                    input_ids=torch.tensor([[next_id]]),
                    past_key_values=output.past_key_values,
                    use_cache=True,
                )
    return ReferenceResult(token_ids=token_ids, top2_gaps=gaps)


@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Build a directory in a staging place beside ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        with contextlib.suppress(OSError):  # another process got there first: its copy is as good
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def reference_logprobs(prompt_ids: list[int], token_ids: list[int], use_cache: bool = True) -> list[float]:
    """log_softmax of the reference model's logits at each of ``token_ids`` following
    ``prompt_ids`` (teacher-forced: one forward over prompt + tokens), one float per token."""
    key = json.dumps([_cache_tag(), list(prompt_ids), list(token_ids)])
    cached = _reference_dir() / f"logprobs-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    if use_cache and cached.exists():
        return [float(x) for x in json.loads(cached.read_text())]
    model = load_reference_model(use_cache)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([list(prompt_ids) + list(token_ids)])).logits[0]
        start = len(prompt_ids) - 1  # the logits at position p predict token p + 1
        logprobs = torch.log_softmax(logits[start : start + len(token_ids)].float(), dim=-1)
        result = [float(logprobs[i, t]) for i, t in enumerate(token_ids)]
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(result))
        os.replace(partial, cached)
    return result
