"""Shared-secret proof for pulling KV: HMAC-SHA256 over the server's one-time nonce and the id.

The secret itself never crosses the wire, and a recorded proof is useless for another
connection (new nonce) or another kv_cache_id.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_nonce() -> str:
    return secrets.token_hex(16)


def prove(secret: str, nonce: str, kv_cache_id: str) -> str:
    return hmac.new(secret.encode(), f"{nonce}:{kv_cache_id}".encode(), hashlib.sha256).hexdigest()


def verify(secret: str, nonce: str, kv_cache_id: str, proof: object) -> bool:
    return isinstance(proof, str) and hmac.compare_digest(prove(secret, nonce, kv_cache_id), proof)
