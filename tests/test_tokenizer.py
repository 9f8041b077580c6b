"""The tokenizer built from GGUF metadata against transformers' own, and streaming detokenization."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
from fixtures_model import load_default_checkpoint
from hf_reference import load_reference_tokenizer

from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer, compile_chat_template

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\r\nmixed",
    "Numbers: 0 7 42 123456789 3.14159 -17 1e-9 2024-06-01",
    "I'm sure they'll say it's fine, we've done what you'd've done.",
    "def fibonacci(n: int) -> int:\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    '{"key": [1, 2, {"nested": null}], "url": "https://example.com/a?b=c&d=e"}',
    "naïve café résumé façade — “quotes” ‘single’ …",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी",
    "Math: ∀x∈ℝ, x² ≥ 0; ∑ᵢ aᵢ = ∞ ≠ ∅",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <file_sep> tokens",
    "UPPER lower MiXeD CamelCaseIdentifier snake_case_name kebab-case-name",
    "a" * 50 + " " + "ab" * 30 + "!!!???...",
    "\u00a0non-breaking\u2009thin\u200bzero-width\ufeffbom",
    "special bytes \x00\x01\x7f and combining e\u0301 vs \u00e9",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi."},
    ],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 🤔 答え"},
    ],
]


def _tokenizer() -> Tokenizer:
    return load_default_checkpoint().tokenizer


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_equals_transformers(add_special_tokens: bool) -> None:
    ours, reference = _tokenizer(), load_reference_tokenizer()
    for text in TEXTS:
        expected = reference(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, repr(text)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_equals_transformers(skip_special_tokens: bool) -> None:
    ours, reference = _tokenizer(), load_reference_tokenizer()
    for text in TEXTS:
        ids = ours.encode(text)
        expected = reference.decode(ids, skip_special_tokens=skip_special_tokens)
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == expected, repr(text)


def test_reads_a_tokenizer_directory_written_by_transformers(tmp_path: Path) -> None:
    # transformers 5 writes tokenizer.json, tokenizer_config.json and chat_template.jinja.
    load_reference_tokenizer().save_pretrained(tmp_path)
    loaded = Tokenizer.from_hf_dir(tmp_path)
    ours = _tokenizer()
    assert loaded.chat_template == ours.chat_template
    assert loaded.config.special_tokens_map() == ours.config.special_tokens_map()
    for text in TEXTS:
        assert loaded.encode(text) == ours.encode(text), repr(text)


def test_plain_text_roundtrips() -> None:
    tokenizer = _tokenizer()
    for text in TEXTS:
        if "<|" not in text and "<file_sep>" not in text:
            assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_are_split_one_by_one() -> None:
    # SmolLM2's pre-tokenizer (llama.cpp "smollm") isolates every digit before BPE.
    tokenizer = _tokenizer()
    ids = tokenizer.encode("x 2024")
    assert [tokenizer.id_to_token(i) for i in ids] == ["x", "Ġ", "2", "0", "2", "4"]


def test_special_tokens() -> None:
    tokenizer = _tokenizer()
    assert tokenizer.vocab_size == 49152
    assert tokenizer.special_token_ids == frozenset(range(17))
    assert (
        tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 2
    )
    assert not tokenizer.config.add_bos_token
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("hi")[0] != tokenizer.bos_token_id


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(add_generation_prompt: bool) -> None:
    ours, reference = _tokenizer(), load_reference_tokenizer()
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        rendered = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert rendered == expected
        assert ours.encode(rendered) == reference(expected)["input_ids"]


def test_chat_template_default_system_prompt() -> None:
    rendered = _tokenizer().apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_helpers_and_sandbox() -> None:
    template = compile_chat_template(
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{{ messages[0] | tojson }}"
    )
    assert template.render(messages=[{"content": "é"}]) == '{"content": "é"}'
    with pytest.raises(jinja2.TemplateError, match="one message only"):
        template.render(messages=[{}, {}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        compile_chat_template("{{ messages.append(1) }}").render(messages=[])


# ---- incremental detokenization -----------------------------------------------------------------

STREAM_TEXTS = [
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵!",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Mixed: naïve café — “quotes” … ∑ᵢ aᵢ ≠ ∅ 🤖 done.",
]


def _stream(
    tokenizer: Tokenizer, prompt_ids: list[int], ids: list[int], skip: bool = True
) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
    pieces = [detokenizer.add(token_id) for token_id in ids]
    assert detokenizer.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_detokenizer_matches_full_decode_without_partial_characters(text: str) -> None:
    tokenizer = _tokenizer()
    prompt_ids = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "Say it."}])
    )
    ids = tokenizer.encode(text)
    pieces = _stream(tokenizer, prompt_ids, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_detokenizer_holds_back_split_characters() -> None:
    tokenizer = _tokenizer()
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # one character, several byte-level tokens
    pieces = _stream(tokenizer, [], ids)
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "😀"


def test_detokenizer_skips_or_keeps_special_tokens() -> None:
    tokenizer = _tokenizer()
    ids = tokenizer.encode("Hello 世界<|im_end|>")
    assert "".join(_stream(tokenizer, [1], ids, skip=True)) == "Hello 世界"
    assert "".join(_stream(tokenizer, [1], ids, skip=False)) == "Hello 世界<|im_end|>"


def test_detokenizer_character_split_across_prompt_and_output() -> None:
    tokenizer = _tokenizer()
    ids = tokenizer.encode("ab😀cd")
    split = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    pieces = _stream(tokenizer, ids[:split], ids[split:])
    assert "".join(pieces) == "😀cd"  # the character's first bytes were in the prompt


def test_detokenizer_flush_emits_an_incomplete_tail() -> None:
    tokenizer = _tokenizer()
    ids = tokenizer.encode("ok 😀")[:-1]  # stop in the middle of the emoji
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    streamed = "".join(detokenizer.add(i) for i in ids)
    assert "\ufffd" not in streamed
    tail = detokenizer.flush()
    assert tail.endswith("\ufffd")
    assert streamed + tail == detokenizer.text == tokenizer.decode(ids)
