"""Reading the planner's JSON catalogues: one section of named entries, user files merged by name.

Both catalogues (hardware, models) are a JSON object with one section, e.g.

    {"about": "...", "accelerators": {"H100-SXM": {...}, "L4": {...}}}

A user file has the same shape. Its entries are merged into the shipped ones field by field: an
entry naming an existing accelerator replaces only the fields it lists (so a file can change one
price), an entry with a new name must be complete. Every problem is a ValueError that names the
file, the entry and the field, because these files are edited by hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar

Entry = TypeVar("Entry")

_TOP_LEVEL_EXTRA_KEYS = ("about",)


def read_section(path: Path | Traversable, section: str) -> dict[str, dict[str, Any]]:
    """The ``section`` object of a catalogue file: entry name -> raw fields."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read catalogue file: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with a {section!r} section")
    unknown = set(data) - {section, *_TOP_LEVEL_EXTRA_KEYS}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; expected {section!r}")
    entries = data.get(section)
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: {section!r} must be an object of named entries")
    for name, fields in entries.items():
        if not name.strip():
            raise ValueError(f"{path}: entry names must not be empty")
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: entry {name!r} must be an object, got {type(fields).__name__}")
    return entries


def merge_entries(
    base: Mapping[str, dict[str, Any]], overrides: Mapping[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``base`` with ``overrides`` applied field by field (a nested object is replaced whole)."""
    merged = {name: dict(fields) for name, fields in base.items()}
    for name, fields in overrides.items():
        merged.setdefault(name, {}).update(fields)
    return merged


class EntryFields:
    """Typed access to one entry's raw fields; `finish()` refuses fields nobody asked for."""

    def __init__(self, where: str, raw: Mapping[str, Any]) -> None:
        self.where = where
        self._raw = raw
        self._used: set[str] = set()

    def _get(self, key: str) -> Any:
        self._used.add(key)
        if key not in self._raw:
            raise ValueError(f"{self.where}: missing field {key!r}")
        return self._raw[key]

    def has(self, key: str) -> bool:
        return key in self._raw

    def number(self, key: str, *, allow_zero: bool = False) -> float:
        """A finite number > 0 (>= 0 with ``allow_zero``)."""
        return self._check_number(key, self._get(key), allow_zero)

    def figure(self, key: str) -> tuple[float, bool]:
        """A positive number, either bare or as ``{"value": x, "verified": bool}``.

        A bare number counts as unverified: nobody said it was checked.
        """
        value = self._get(key)
        if isinstance(value, dict):
            unknown = set(value) - {"value", "verified", "note"}
            if unknown or "value" not in value:
                raise ValueError(
                    f"{self.where}: field {key!r} must be a number or "
                    f'{{"value": number, "verified": bool, "note": str}}, got keys {sorted(value)}'
                )
            verified = value.get("verified", False)
            if not isinstance(verified, bool):
                raise ValueError(f"{self.where}: {key}.verified must be true or false")
            return self._check_number(key, value["value"], False), verified
        return self._check_number(key, value, False), False

    def integer(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{self.where}: field {key!r} must be a positive integer, got {value!r}")
        return value

    def optional_integer(self, key: str) -> int | None:
        if key not in self._raw or self._raw[key] is None:
            self._used.add(key)
            return None
        return self.integer(key)

    def text(self, key: str, default: str | None = None) -> str:
        if default is not None and key not in self._raw:
            self._used.add(key)
            return default
        value = self._get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{self.where}: field {key!r} must be a non-empty string, got {value!r}")
        return value

    def flag(self, key: str, default: bool | None = None) -> bool:
        if default is not None and key not in self._raw:
            self._used.add(key)
            return default
        value = self._get(key)
        if not isinstance(value, bool):
            raise ValueError(f"{self.where}: field {key!r} must be true or false, got {value!r}")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        """A list of strings (empty when the field is absent)."""
        if key not in self._raw:
            self._used.add(key)
            return ()
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"{self.where}: field {key!r} must be a list of strings")
        return tuple(value)

    def nested(self, key: str) -> EntryFields | None:
        """A nested object (None when absent or null)."""
        self._used.add(key)
        value = self._raw.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"{self.where}: field {key!r} must be an object or null")
        return EntryFields(f"{self.where}.{key}", value)

    def finish(self) -> None:
        unknown = set(self._raw) - self._used
        if unknown:
            raise ValueError(f"{self.where}: unknown fields {sorted(unknown)}")

    def _check_number(self, key: str, value: Any, allow_zero: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{self.where}: field {key!r} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{self.where}: field {key!r} must be finite and {bound}, got {value!r}")
        return float(value)


def load_catalogue(
    shipped_name: str, section: str, kind: str, path: Path | None,
    parse: Callable[[str, EntryFields], Entry],
) -> dict[str, Entry]:
    """The shipped ``data/<shipped_name>`` catalogue with the user file at ``path`` merged in by
    name, each entry parsed by ``parse``; errors name the file the entry came from."""
    entries = read_section(resources.files("pdserve.planner") / "data" / shipped_name, section)
    overridden: set[str] = set()
    if path is not None:
        user_entries = read_section(path, section)
        overridden = set(user_entries)
        entries = merge_entries(entries, user_entries)
    catalogue = {}
    for name, raw in entries.items():
        origin = path if name in overridden else f"{shipped_name} (shipped)"
        catalogue[name] = parse(name, EntryFields(f"{origin}: {kind} {name!r}", raw))
    return catalogue
