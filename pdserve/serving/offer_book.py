"""The KV offers this router's prefill workers made for ``POST /v1/prefill``: a redemption names
an offer, never an address.

A client's ``kv_transfer_params`` used to carry the KV server's address, and the decode worker
dialled whatever address it was given: any client could make a worker connect to a host and
port of its choosing (and, with ``--kv-secret``, answer that host's challenge). Now the router
records each offer it handed out, with the address its own prefill worker advertised and the
tenant that asked; a redemption is looked up by its offer id, once, by the same tenant, within
the TTL. Anything else (an unknown id, another tenant's offer, an expired one, another router's)
is recomputed on the decode worker: the answer is the same, only slower. The address a client
sends back is ignored.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Offer:
    kv_address: str
    tenant: str | None
    expires_at: float


class OfferBook:
    """Offers by id, bounded in count and age (the oldest go first)."""

    def __init__(self, ttl: float = 60.0, capacity: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """ttl: seconds an offer stays redeemable here, beyond any prefill worker's lease
        (``--kv-lease-ttl``, 10 s by default), which frees the KV itself."""
        if ttl <= 0 or capacity < 1:
            raise ValueError("ttl and capacity must be positive")
        self.ttl, self.capacity, self._clock = ttl, capacity, clock
        self._offers: OrderedDict[str, Offer] = OrderedDict()

    def record(self, kv_cache_id: str, kv_address: str, tenant: str | None) -> None:
        self._expire()
        self._offers[kv_cache_id] = Offer(kv_address, tenant, self._clock() + self.ttl)
        self._offers.move_to_end(kv_cache_id)
        while len(self._offers) > self.capacity:
            self._offers.popitem(last=False)

    def redeem(self, kv_cache_id: str, tenant: str | None) -> str | None:
        """The address to pull ``kv_cache_id`` from, once; None when this router made no such
        offer for this tenant, or it expired (the request is then recomputed)."""
        self._expire()
        offer = self._offers.get(kv_cache_id)
        if offer is None or offer.tenant != tenant:
            return None
        del self._offers[kv_cache_id]
        return offer.kv_address

    def __len__(self) -> int:
        return len(self._offers)

    def _expire(self) -> None:
        now = self._clock()
        while self._offers:
            oldest_id, oldest = next(iter(self._offers.items()))
            if oldest.expires_at > now:
                return
            del self._offers[oldest_id]
