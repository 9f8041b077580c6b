"""The router's record of its KV offers: redeemed once, by their tenant, within the TTL."""

from __future__ import annotations

import pytest

from pdserve.serving.offer_book import OfferBook


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_an_offer_is_redeemed_once_by_its_tenant_within_the_ttl() -> None:
    clock = Clock()
    book = OfferBook(ttl=10.0, clock=clock)
    book.record("a", "127.0.0.1:7001", "alice")
    book.record("b", "127.0.0.1:7002", None)
    assert book.redeem("a", "mallory") is None, "another tenant's offer"
    assert book.redeem("a", "alice") == "127.0.0.1:7001"
    assert book.redeem("a", "alice") is None, "an offer is redeemed once"
    assert book.redeem("never-made", None) is None
    clock.now += 10.0
    assert book.redeem("b", None) is None and len(book) == 0, "expired"


def test_the_book_keeps_at_most_its_capacity_dropping_the_oldest() -> None:
    book = OfferBook(capacity=2, clock=Clock())
    for name in ("first", "second", "third"):
        book.record(name, f"127.0.0.1:{len(name)}", None)
    assert len(book) == 2 and book.redeem("first", None) is None
    assert book.redeem("third", None) == "127.0.0.1:5"
    with pytest.raises(ValueError):
        OfferBook(ttl=0)
