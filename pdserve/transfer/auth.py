"""Shared-secret proofs of a KV pull, one each way: HMAC-SHA256 over nonces, ids and addresses.

The secret itself never crosses the wire. The receiver proves it over the server's one-time
nonce, the kv_cache_id *and the server address it dialed*: a recorded proof is useless on
another connection, for another id, and a proof a rogue server obtains cannot be relayed to a
real server, whose own address differs from the rogue's. The server answers with a proof over
the receiver's nonce, so a peer without the secret cannot pose as a KV server and feed KV.
Each proof names its direction, so one can never stand in for the other.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets


def new_nonce() -> str:
    return secrets.token_hex(16)


def prove_pull(secret: str, nonce: str, kv_cache_id: str, server: str) -> str:
    """The receiver's proof: it knows the secret, pulls ``kv_cache_id`` and dialed ``server``."""
    return _mac(secret, "pull", nonce, kv_cache_id, server)


def prove_server(secret: str, nonce: str, kv_cache_id: str) -> str:
    """The server's answer over the receiver's nonce: it knows the secret too."""
    return _mac(secret, "serve", nonce, kv_cache_id)


def verify(expected: str, proof: object) -> bool:
    return isinstance(proof, str) and hmac.compare_digest(expected, proof)


def _mac(secret: str, *fields: str) -> str:
    # A JSON list, not a joined string: no two different field lists give the same message.
    return hmac.new(secret.encode(), json.dumps(fields).encode(), hashlib.sha256).hexdigest()
