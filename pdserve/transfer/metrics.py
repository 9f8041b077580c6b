"""Prometheus metrics of one worker's KV transfers, in a registry of their own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BANDWIDTH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)


class TransferMetrics:
    """Counters and histograms for both directions; ``registry`` is what /metrics exposes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.started = Counter(
            "pdserve_kv_transfers_started", "KV transfers begun", ["direction"], registry=r
        )
        self.completed = Counter(
            "pdserve_kv_transfers_completed", "KV transfers that delivered the KV", ["direction"], registry=r
        )
        self.failed = Counter(
            "pdserve_kv_transfers_failed", "KV transfers that failed, by reason", ["direction", "reason"],
            registry=r,
        )
        self.bytes = Counter(
            "pdserve_kv_transfer_bytes", "KV payload bytes moved, by the codec they travelled in",
            ["direction", "codec"], registry=r,
        )
        # Pipelining is otherwise invisible: a pipelined transfer that silently waited for the
        # whole prefill would look like any other.
        self.early = Counter(
            "pdserve_kv_transfers_early", "Transfers claimed before the prefill ended (the receiver connected early)",
            ["direction"], registry=r,
        )
        self.early_bytes = Counter(
            "pdserve_kv_transfer_early_bytes", "Payload bytes sent while the prefill still ran (pipelined tcp)",
            registry=r,
        )
        # What --kv-codec auto chose for each layer it sent, and why (transfer/codec_choice.py).
        self.auto_codec_layers = Counter(
            "pdserve_kv_auto_codec_layers", "Layers a KV server sent under codec auto, by the codec and the reason",
            ["codec", "reason"], registry=r,
        )
        self.duration = Histogram(
            "pdserve_kv_transfer_seconds", "Wall time of a KV transfer", ["direction"],
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.bandwidth = Histogram(
            "pdserve_kv_transfer_gbps", "Effective payload GB/s of a KV transfer", ["direction"],
            buckets=_BANDWIDTH_BUCKETS, registry=r,
        )
        self.expired_leases = Counter(
            "pdserve_kv_expired_leases", "Offered KV freed because nobody claimed it in time", registry=r
        )
        self.held_blocks = Gauge(
            "pdserve_kv_blocks_held_for_transfer", "KV blocks kept alive for a transfer", registry=r
        )

    def record_success(self, direction: str, bytes_by_codec: dict[str, int], seconds: float) -> None:
        """``bytes_by_codec``: payload bytes by what they travelled in ("none" for raw KV, also
        shared-memory copies); an ``auto`` transfer may mix codecs."""
        self.completed.labels(direction).inc()
        for codec, num_bytes in bytes_by_codec.items():
            self.bytes.labels(direction, codec).inc(num_bytes)
        self.duration.labels(direction).observe(seconds)
        if seconds > 0:
            self.bandwidth.labels(direction).observe(sum(bytes_by_codec.values()) / seconds / 1e9)
