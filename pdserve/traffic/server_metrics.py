"""What the server itself measured during a load run: deltas of pdserve's Prometheus metrics.

The load generator sees the client's side; pdserve's router and workers export their own view
(docs/metrics.md): queue wait, prefill, KV transfer time and bytes, time per phase, KV usage.
Counters and histograms only grow, so scraping them just before and just after the load and
subtracting gives what the load did, without the calibration requests or earlier runs.
Percentiles come from the histogram buckets, interpolated linearly inside the bucket the rank
falls in (as Prometheus's ``histogram_quantile``): approximate, only as fine as the buckets.
Gauges (KV usage, queue lengths) have no history, so the workers' are sampled during the load.

Workers are found through the router (``/admin/workers``, else ``/health``). A target without
pdserve metrics (a peer, or no ``/metrics`` at all) yields an empty section, not an error.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pdserve.traffic.stats import percentile

PREFIX = "pdserve_"
QUANTILES = (0.5, 0.9)
KV_USAGE_RATIO = "pdserve_worker_kv_usage_ratio"


@dataclass(frozen=True)
class HistogramCounts:
    buckets: tuple[tuple[float, float], ...]
    """(upper bound, cumulative count), ascending; the last bound is +inf."""
    count: float
    sum: float

    def minus(self, earlier: HistogramCounts) -> HistogramCounts:
        if self.count < earlier.count:  # the process restarted in between: all of it is new
            return self
        before = dict(earlier.buckets)
        return HistogramCounts(tuple((bound, n - before.get(bound, 0.0)) for bound, n in self.buckets),
                               self.count - earlier.count, self.sum - earlier.sum)

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1): the bucket holding rank q x count, interpolated linearly from its
        lower bound (0 for the first bucket); beyond the last finite bound, that bound."""
        if self.count <= 0:
            return None
        rank = q * self.count
        lower_bound, lower_count = 0.0, 0.0
        for bound, cumulative in self.buckets:
            if cumulative >= rank and cumulative > lower_count:
                if math.isinf(bound):
                    return lower_bound
                return lower_bound + (bound - lower_bound) * (rank - lower_count) / (cumulative - lower_count)
            lower_bound, lower_count = bound, cumulative
        return lower_bound

    def to_json(self) -> dict[str, float | None]:
        return {"count": self.count, "sum": self.sum, "mean": self.mean,
                **{f"p{round(q * 100)}": self.quantile(q) for q in QUANTILES}}


@dataclass(frozen=True)
class Snapshot:
    """One scrape's pdserve metrics, keyed as Prometheus shows them: ``name{label="value",...}``."""

    histograms: dict[str, HistogramCounts]
    counters: dict[str, float]
    gauges: dict[str, float]

    def minus(self, earlier: Snapshot) -> Snapshot:
        """Histograms and counters: what happened since ``earlier``; gauges: as now."""
        histograms = {k: h.minus(earlier.histograms[k]) if k in earlier.histograms else h
                      for k, h in self.histograms.items()}
        counters = {k: v - earlier.counters.get(k, 0.0) if v >= earlier.counters.get(k, 0.0) else v
                    for k, v in self.counters.items()}
        return Snapshot(histograms, counters, dict(self.gauges))


def parse_metrics(text: str) -> Snapshot:
    """pdserve's metrics out of Prometheus text; every other family is ignored."""
    histograms: dict[str, HistogramCounts] = {}
    counters: dict[str, float] = {}
    gauges: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(PREFIX):
            continue
        if family.type == "histogram":
            parts: dict[str, dict[str, Any]] = {}
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != "le"}
                part = parts.setdefault(metric_key(family.name, labels), {"buckets": [], "count": 0.0, "sum": 0.0})
                if sample.name.endswith("_bucket"):
                    part["buckets"].append((float(sample.labels["le"]), float(sample.value)))
                elif sample.name.endswith("_count"):
                    part["count"] = float(sample.value)
                elif sample.name.endswith("_sum"):
                    part["sum"] = float(sample.value)
            for key, part in parts.items():
                histograms[key] = HistogramCounts(tuple(sorted(part["buckets"])), part["count"], part["sum"])
        elif family.type == "counter":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counters[metric_key(sample.name, sample.labels)] = float(sample.value)
        elif family.type == "gauge" and not family.name.endswith("_created"):  # creation stamps: no use
            for sample in family.samples:
                gauges[metric_key(sample.name, sample.labels)] = float(sample.value)
    return Snapshot(histograms, counters, gauges)


def source_delta(before: Snapshot, after: Snapshot, samples: Iterable[Snapshot] = ()) -> dict[str, Any]:
    """One process's section: histograms (count, sum, mean, p50, p90) and counters of what happened
    between the two scrapes, gauges before and after (and over ``samples`` taken in between)."""
    delta = after.minus(before)
    sampled: dict[str, list[float]] = {}
    for snapshot in samples:
        for key, value in snapshot.gauges.items():
            sampled.setdefault(key, []).append(value)
    gauges: dict[str, dict[str, Any]] = {}
    for key, value in after.gauges.items():
        gauges[key] = {"before": before.gauges.get(key), "after": value}
        if values := sampled.get(key):
            gauges[key].update(mean=sum(values) / len(values), p50=percentile(values, 50),
                               p90=percentile(values, 90), max=max(values), samples=len(values))
    section: dict[str, Any] = {
        "histograms": {k: h.to_json() for k, h in sorted(delta.histograms.items()) if h.count > 0},
        "counters": {k: v for k, v in sorted(delta.counters.items()) if v},
        "gauges": gauges,
    }
    # Request-seconds per phase over requests ended: where an average request's time went here.
    ended = sum(v for k, v in delta.counters.items() if k.startswith("pdserve_worker_requests_total"))
    if ended > 0:
        section["per_request"] = {
            f"{phase}_seconds": (
                delta.counters.get(f'pdserve_worker_phase_seconds_total{{phase="{phase}"}}', 0.0) / ended
            )
            for phase in ("prefill", "decode")}
    return section


@dataclass(frozen=True)
class Endpoint:
    url: str
    """The process's /metrics URL."""
    role: str
    """router, prefill, decode or both."""


class ServerMetricsRecorder:
    """``with ServerMetricsRecorder(url) as recorder: <the load>``, then ``recorder.section``.

    Entering scrapes the router and its workers and starts sampling the workers' gauges every
    ``sample_interval`` seconds; leaving stops that and scrapes again. The sampler only fetches
    text during the load (parsing waits until the end) to take as little as possible from the
    load generator's timing on the same cores.
    """

    def __init__(self, base_url: str, sample_interval: float = 1.0, timeout: float = 5.0,
                 headers: dict[str, str] | None = None) -> None:
        """``headers``: sent with every scrape (a Bearer token for workers behind a secret)."""
        self.base_url = base_url.rstrip("/")
        self.headers = headers or {}
        self.sample_interval = sample_interval
        self.timeout = timeout
        self.section: dict[str, Any] = {}
        self._before: dict[Endpoint, Snapshot] = {}
        self._samples: dict[Endpoint, list[str]] = {}
        self._unreachable: list[str] = []
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> ServerMetricsRecorder:
        with httpx.Client(timeout=self.timeout, headers=self.headers) as client:
            router = Endpoint(f"{self.base_url}/metrics", "router")
            snapshot = _scrape(client, router.url)
            if snapshot is None or not (snapshot.histograms or snapshot.counters):
                return self  # not pdserve: nothing to record
            self._before[router] = snapshot
            for worker in _workers(client, self.base_url):
                if (worker_snapshot := _scrape(client, worker.url)) is None:
                    self._unreachable.append(worker.url)
                else:
                    self._before[worker] = worker_snapshot
                    self._samples[worker] = []
        if self._samples:
            self._sampler = threading.Thread(target=self._sample, name="server-metrics", daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        if not self._before:
            return
        sources: list[dict[str, Any]] = []
        with httpx.Client(timeout=self.timeout, headers=self.headers) as client:
            for endpoint, before in self._before.items():
                after = _scrape(client, endpoint.url)
                if after is None:
                    self._unreachable.append(endpoint.url)
                    continue
                samples = [parse_metrics(text) for text in self._samples.get(endpoint, [])]
                sources.append({"url": endpoint.url, "role": endpoint.role,
                                **source_delta(before, after, samples)})
        routers = [s for s in sources if s["role"] == "router"]
        self.section = {"router": routers[0] if routers else {},
                        "workers": [s for s in sources if s["role"] != "router"],
                        "unreachable": self._unreachable, "sample_interval": self.sample_interval}

    def _sample(self) -> None:
        with httpx.Client(timeout=self.timeout, headers=self.headers) as client:
            while not self._stop.wait(self.sample_interval):
                for endpoint, texts in self._samples.items():
                    try:
                        response = client.get(endpoint.url)
                    except httpx.HTTPError:
                        continue
                    if response.status_code == 200:
                        texts.append(response.text)


def _workers(client: httpx.Client, base_url: str) -> list[Endpoint]:
    """The router's workers: /admin/workers (loopback or the admin key), else /health's list."""
    for path in ("/admin/workers", "/health"):
        try:
            response = client.get(base_url + path)
            listed = response.json().get("workers") if response.status_code in (200, 503) else None
        except (httpx.HTTPError, ValueError, AttributeError):
            continue
        if isinstance(listed, list):
            return [Endpoint(f"{str(w['url']).rstrip('/')}/metrics", str(w.get("role", "?")))
                    for w in listed if isinstance(w, dict) and w.get("url")]
    return []


def _scrape(client: httpx.Client, url: str) -> Snapshot | None:
    try:
        response = client.get(url)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        return parse_metrics(response.text)
    except Exception:  # whatever a peer serves there, text that does not parse is no metrics
        return None


def metric_key(name: str, labels: dict[str, str]) -> str:
    """How a sample is keyed in a :class:`Snapshot`: ``name{label="value",...}``, labels sorted."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def headline(section: dict[str, Any]) -> dict[str, float | None]:
    """A few numbers for a comparison's table: router p90s of queue wait, prefill and KV transfer
    (seconds), decode time per request (the decoding workers' mean) and the fullest worker's KV
    usage (mean and max of the samples). None where the server did not measure it."""
    router = section.get("router", {}).get("histograms", {})
    workers = section.get("workers", [])
    decode = [d for w in workers if (d := w.get("per_request", {}).get("decode_seconds"))]
    usage = [u for w in workers if "mean" in (u := w.get("gauges", {}).get(KV_USAGE_RATIO, {}))]
    fullest = max(usage, key=lambda u: u["mean"]) if usage else {}
    return {
        "queue_p90": router.get("pdserve_router_queue_seconds", {}).get("p90"),
        "prefill_p90": router.get("pdserve_router_prefill_seconds", {}).get("p90"),
        "kv_transfer_p90": router.get("pdserve_router_kv_transfer_seconds", {}).get("p90"),
        "decode_mean": sum(decode) / len(decode) if decode else None,
        "kv_usage_mean": fullest.get("mean"),
        "kv_usage_max": fullest.get("max"),
    }
