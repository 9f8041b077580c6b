"""API keys and the tenants they stand for.

A key is given as ``KEY`` or ``TENANT=KEY`` (``--api-key``, repeatable, or ``$PDSERVE_API_KEY``,
comma-separated). Each tenant's prompts are hashed into the prefix cache with the tenant as
salt, so two tenants never share cached KV blocks, and cannot time each other's prompts through
cache hits. A bare ``KEY`` is a tenant of its own (named after the key's position).
Keys are compared in constant time, against every key, so a response time says nothing of how
close a guess was.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.serving.errors import APIError


@dataclass(frozen=True)
class ApiKey:
    key: str
    tenant: str


def parse_api_keys(specs: Sequence[str]) -> tuple[ApiKey, ...]:
    """``["sk-1", "team-a=sk-2"]`` -> keys with their tenants; a clear error for a bad spec."""
    keys: list[ApiKey] = []
    for index, spec in enumerate(s for text in specs for s in text.split(",") if s.strip()):
        tenant, sep, key = spec.strip().rpartition("=")
        tenant = tenant if sep else f"key{index}"
        if not key or (sep and not tenant):
            raise ValueError(f"an API key spec must be KEY or TENANT=KEY, got {spec!r}")
        keys.append(ApiKey(key, tenant))
    if len({k.key for k in keys}) != len(keys):
        raise ValueError("the same API key is given twice")
    return tuple(keys)


def tenant_of(keys: Sequence[ApiKey], authorization: str | None) -> str | None:
    """The tenant of ``Authorization: Bearer KEY``; None when no keys are configured (open server).

    Raises a 401 APIError for a missing or unknown key.
    """
    if not keys:
        return None
    scheme, _, presented = (authorization or "").partition(" ")
    presented_bytes = presented.strip().encode()
    found: str | None = None
    for candidate in keys:  # no early exit: every key is compared
        if hmac.compare_digest(candidate.key.encode(), presented_bytes) and scheme.lower() == "bearer":
            found = candidate.tenant
    if found is None:
        raise APIError("invalid API key: send 'Authorization: Bearer <key>'", 401, code="invalid_api_key")
    return found
