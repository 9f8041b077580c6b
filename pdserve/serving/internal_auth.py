"""The shared secret that guards a worker's internal API when it listens off loopback.

On loopback only local processes can reach a worker, so its API is open. Listening on any other
address, a worker refuses to start without ``--internal-secret`` (or
``$PDSERVE_INTERNAL_SECRET``); then every request but ``/health`` must carry
``Authorization: Bearer <secret>`` (the router sends it: ``pdserve router --worker-secret``).
``/health`` stays open so that load balancers and supervisors can probe without the secret.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve.serving.errors import error_body
from pdserve.transfer.config import is_loopback

OPEN_PATHS = frozenset({"/health"})


def check_internal_secret(host: str, secret: str | None) -> None:
    """Refuse to serve the internal API off loopback without a secret."""
    if not is_loopback(host) and not secret:
        raise ValueError(
            f"the worker would listen on {host}, off loopback: set --internal-secret (or "
            "$PDSERVE_INTERNAL_SECRET) so that only the router can submit work"
        )


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
