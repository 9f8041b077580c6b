"""The shared secret that guards a worker's internal API, and the worker's proof that it holds it.

Listening on any address but loopback, a worker refuses to start without ``--internal-secret``
(or ``$PDSERVE_INTERNAL_SECRET``); ``pdserve serve`` gives its loopback workers one too, drawn
per run, since other local users are not trusted either. With a secret, every request but
``/health`` and ``/metrics`` must carry ``Authorization: Bearer <secret>`` (the router sends
it: ``pdserve router --worker-secret``). Those two stay open so that load balancers and
Prometheus can probe without it: they tell counts and timings, never a prompt or an output.

The other way round, a worker proves the secret to whoever checks its health: a ``/health``
carrying a challenge (a fresh nonce) is answered with an HMAC over it. So the router and the
supervisor admit, and re-admit after a restart, only a process that holds the secret, never
another one that took the worker's port meanwhile (and would be sent every prompt).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve.serving.errors import error_body
from pdserve.transfer.config import is_loopback

OPEN_PATHS = frozenset({"/health", "/metrics"})
CHALLENGE_HEADER = "x-pdserve-challenge"
PROOF_HEADER = "x-pdserve-proof"


def check_internal_secret(host: str, secret: str | None) -> None:
    """Refuse to serve the internal API off loopback without a secret."""
    if not is_loopback(host) and not secret:
        raise ValueError(
            f"the worker would listen on {host}, off loopback: set --internal-secret (or "
            "$PDSERVE_INTERNAL_SECRET) so that only the router can submit work"
        )


def prove_identity(secret: str, challenge: str) -> str:
    return hmac.new(secret.encode(), f"worker-identity:{challenge}".encode(), hashlib.sha256).hexdigest()


def identity_challenge() -> tuple[str, dict[str, str]]:
    """A fresh challenge, and the headers that carry it on a ``/health`` request."""
    challenge = secrets.token_hex(16)
    return challenge, {CHALLENGE_HEADER: challenge}


def proves_identity(secret: str | None, challenge: str, headers: Mapping[str, str]) -> bool:
    """Did the worker answer ``challenge`` with the secret? (Always, when there is no secret.)"""
    if secret is None:
        return True
    return hmac.compare_digest(prove_identity(secret, challenge), headers.get(PROOF_HEADER, ""))


class InternalSecret:
    """ASGI middleware: 401 for requests without the bearer secret (except ``OPEN_PATHS``)."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self.expected = f"Bearer {secret}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        presented = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(presented, self.expected):
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body("this worker's internal API needs its shared secret", 401)).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
