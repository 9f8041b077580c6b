"""Text <-> token ids: the model's tokenizer, its chat template, and streaming detokenization.

The heavy lifting is done by the Rust ``tokenizers`` library; this module adds what a model
directory carries besides ``tokenizer.json`` (special tokens, BOS/EOS policy, chat template) and
turns a stream of generated ids into a stream of complete characters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import processors

_REPLACEMENT_CHAR = "\ufffd"
"""What a byte-level decoder yields for an incomplete UTF-8 sequence."""


@dataclass(frozen=True)
class TokenizerConfig:
    """What ``tokenizer_config.json`` says besides the vocabulary: special tokens and policies."""

    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool | None = None
    """Prepend BOS when encoding with special tokens (SmolLM2: no). None: tokenizer.json's
    post-processor alone decides (as for Llama 3, whose config does not say)."""
    add_eos_token: bool | None = None
    chat_template: str | None = None
    """Jinja2 source rendering a list of messages into a prompt, as Hugging Face defines it."""
    model_max_length: int | None = None

    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens a chat template may refer to (``bos_token`` ...)."""
        named = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        return {name: token for name, token in named.items() if token is not None}

    @classmethod
    def from_hf_json(
        cls, data: Mapping[str, Any], chat_template: str | None = None
    ) -> TokenizerConfig:
        """Read a parsed ``tokenizer_config.json``; ``chat_template`` overrides a template in it."""
        template = (
            chat_template
            if chat_template is not None
            else _named_template(data.get("chat_template"))
        )
        max_length = data.get("model_max_length")
        return cls(
            bos_token=_token_content(data.get("bos_token")),
            eos_token=_token_content(data.get("eos_token")),
            unk_token=_token_content(data.get("unk_token")),
            pad_token=_token_content(data.get("pad_token")),
            add_bos_token=_optional_bool(data.get("add_bos_token")),
            add_eos_token=_optional_bool(data.get("add_eos_token")),
            chat_template=template,
            # Tokenizers without a limit store a huge sentinel (int(1e30)); keep only real limits.
            model_max_length=int(max_length)
            if isinstance(max_length, int) and max_length < 2**40
            else None,
        )

    def to_hf_json(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` transformers (4.x and 5.x) and vLLM read."""
        data: dict[str, Any] = {
            # The generic class loads tokenizer.json as it is, without re-deriving its pipeline.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            **self.special_tokens_map(),
        }
        for flag in ("add_bos_token", "add_eos_token"):
            if getattr(self, flag) is not None:
                data[flag] = getattr(self, flag)
        if self.model_max_length is not None:
            data["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            data["chat_template"] = self.chat_template
        return data


class Tokenizer:
    """A model's tokenizer: encode, decode, chat template, special tokens."""

    def __init__(self, backend: RustTokenizer, config: TokenizerConfig) -> None:
        self._backend = backend
        self._config = config
        self._chat_template: jinja2.Template | None = None

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, directory: Path) -> Tokenizer:
        """Load ``tokenizer.json`` plus ``tokenizer_config.json`` (and ``chat_template.jinja``)."""
        backend = RustTokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        raw_config: dict[str, Any] = (
            json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        )
        # transformers 5 writes the template to its own file; older exports keep it in the config.
        template_path = directory / "chat_template.jinja"
        template = template_path.read_text(encoding="utf-8") if template_path.exists() else None
        special_map_path = directory / "special_tokens_map.json"
        if special_map_path.exists():
            special_map = json.loads(special_map_path.read_text(encoding="utf-8"))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
                raw_config.setdefault(name, special_map.get(name))
        config = TokenizerConfig.from_hf_json(raw_config, chat_template=template)
        if config.add_bos_token is not None or config.add_eos_token is not None:
            # An explicit flag wins over tokenizer.json's post-processor, as in HF's Llama tokenizer.
            backend = with_special_token_template(backend, config)
        return cls(backend, config)

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with special tokens, BOS/EOS only where the model asks for them.
        ValueError for text that is not valid Unicode (a lone surrogate, which the backend would
        refuse with a TypeError)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return str(self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        token_id = self._backend.token_to_id(token)
        return int(token_id) if token_id is not None else None

    def id_to_token(self, token_id: int) -> str | None:
        token = self._backend.id_to_token(token_id)
        return str(token) if token is not None else None

    # ---- chat template ------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self._config.chat_template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) into the model's prompt text."""
        if self._config.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        if self._chat_template is None:
            self._chat_template = compile_chat_template(self._config.chat_template)
        variables: dict[str, Any] = {
            **self._config.special_tokens_map(),
            "messages": [dict(message) for message in messages],
            "add_generation_prompt": add_generation_prompt,
            "tools": None,
            "documents": None,
            **template_kwargs,
        }
        return str(self._chat_template.render(**variables))

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """A chat's prompt as token ids: the template rendered, then encoded as it is."""
        text = self.apply_chat_template(list(messages), add_generation_prompt=True)
        # The template writes special tokens as text; do not add them a second time.
        return self.encode(text, add_special_tokens=False)

    # ---- vocabulary facts ---------------------------------------------------------------------

    @property
    def config(self) -> TokenizerConfig:
        return self._config

    @property
    def backend(self) -> RustTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (for batch encoding or offsets)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (dropped by ``decode(skip_special_tokens=True)``)."""
        decoder = self._backend.get_added_tokens_decoder()
        return frozenset(int(token_id) for token_id, token in decoder.items() if token.special)

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id(self._config.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id(self._config.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id(self._config.pad_token)

    def _named_id(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    # ---- export -------------------------------------------------------------------------------

    def to_hf_json(self) -> str:
        """The ``tokenizer.json`` text of this tokenizer."""
        return str(self._backend.to_str(pretty=True))

    def save_hf(self, directory: Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(self.to_hf_json(), encoding="utf-8")
        (directory / "tokenizer_config.json").write_text(
            json.dumps(self._config.to_hf_json(), indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )

    def to_wire(self) -> dict[str, Any]:
        """This tokenizer as JSON-able data, for a process that holds no model (the router)."""
        return {"tokenizer_json": self.to_hf_json(), "tokenizer_config": self._config.to_hf_json()}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Tokenizer:
        """The inverse of :meth:`to_wire` (tokenizer.json already carries the BOS/EOS policy)."""
        backend = RustTokenizer.from_str(str(data["tokenizer_json"]))
        return cls(backend, TokenizerConfig.from_hf_json(data["tokenizer_config"]))

    def with_config(self, **changes: Any) -> Tokenizer:
        """A copy with some ``TokenizerConfig`` fields replaced (the backend is shared)."""
        return Tokenizer(self._backend, replace(self._config, **changes))


def with_special_token_template(backend: RustTokenizer, config: TokenizerConfig) -> RustTokenizer:
    """``backend`` with a post-processor adding exactly the BOS/EOS ``config`` asks for."""
    special_tokens: list[tuple[str, int]] = []
    starts: list[str] = []
    ends: list[str] = []
    for token, wanted, where in (
        (config.bos_token, config.add_bos_token, starts),
        (config.eos_token, config.add_eos_token, ends),
    ):
        if not wanted or token is None:
            continue
        token_id = backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        special_tokens.append((token, token_id))
        where.append(token)
    single = " ".join([*starts, "$A", *ends])
    pair = " ".join([single, *(f"{t}:1" for t in starts), "$B:1", *(f"{t}:1" for t in ends)])
    # Replace via JSON: the Python binding offers no other way to copy a Tokenizer.
    copy = RustTokenizer.from_str(backend.to_str())
    copy.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special_tokens
    )
    return copy


# ---- chat template rendering --------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks: render it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    # Templates call this to reject conversations they cannot render (e.g. wrong role order).
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a Hugging Face chat template in a sandbox, with the helpers HF templates rely on."""
    # Templates come from model files, i.e. untrusted: the immutable sandbox blocks attribute
    # access to internals and mutation of the inputs. trim/lstrip_blocks match HF's rendering.
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(source)


def _token_content(value: Any) -> str | None:
    # Special tokens are stored as plain strings or as AddedToken dicts {"content": ...}.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _optional_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _named_template(value: Any) -> str | None:
    # A config may hold several templates [{"name": "default", "template": ...}, ...].
    if isinstance(value, list):
        by_name = {
            item.get("name"): item.get("template") for item in value if isinstance(item, Mapping)
        }
        value = by_name.get("default")
    return value if isinstance(value, str) else None


# ---- streaming detokenization -------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns generated token ids, one at a time, into newly completed text.

    Byte-level BPE tokens are byte strings: one character's UTF-8 bytes may span tokens, and a
    token may end mid-character. Text is emitted only once the decoded tail is complete (does not
    end in U+FFFD); until then it is held back. Decoding only a short window of recent tokens
    keeps each step O(1): ``prefix_offset`` starts the window, ``read_offset`` marks where the
    already-emitted text ends.
    """

    _PROMPT_CONTEXT_TOKENS = 5
    """Prompt tokens kept as left context, so decoders that strip a leading space see none."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-self._PROMPT_CONTEXT_TOKENS :])
        self._token_ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        # A prompt may end mid-character; its tail bytes then belong to the first emitted text.
        while self._read_offset > 0 and self._decode(context[: self._read_offset]).endswith(
            _REPLACEMENT_CHAR
        ):
            self._read_offset -= 1
        self._pieces: list[str] = []

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text it completes (often "", sometimes several chars)."""
        self._token_ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of generation, emit whatever was held back (an incomplete tail decodes to U+FFFD)."""
        return self._advance(final=True)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _advance(self, final: bool) -> str:
        ids = self._token_ids
        prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(ids[self._prefix_offset :])
        if len(window_text) <= len(prefix_text) or (
            window_text.endswith(_REPLACEMENT_CHAR) and not final
        ):
            return ""
        new_text = window_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        self._pieces.append(new_text)
        return new_text
