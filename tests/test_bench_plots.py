"""The load benchmark's PNG plots and report re-rendering (from hand-built records and a hand-built
comparison), and the server-side metrics: deltas and bucket percentiles from hand-written
Prometheus text, and the recorder against a fake pdserve and a fake peer."""

from __future__ import annotations

import argparse
import json
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pdserve.bench.load.command import run_report
from pdserve.bench.load.compare import compare_markdown
from pdserve.bench.load.plots import cdf_rate
from pdserve.bench.load.report import write_run
from pdserve.traffic.records import RequestRecord
from pdserve.traffic.server_metrics import (
    ServerMetricsRecorder,
    headline,
    parse_metrics,
    source_delta,
)
from pdserve.traffic.stats import SLO, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(index: int, sent: float, ttft: float, tpot: float, tokens: int, error: str | None = None) -> RequestRecord:
    first = sent + ttft
    times = [first + i * tpot for i in range(tokens)]
    return RequestRecord(index, "chat", sent, sent=sent, first_token=first, end=times[-1], chunk_times=times,
                         chunk_tokens=[1] * tokens, prompt_tokens=50, output_tokens=tokens, max_tokens=tokens,
                         error=error)


def records_for(rate: float, slowdown: float) -> list[RequestRecord]:
    """Twelve requests a second apart / rate, latencies growing with ``slowdown``, one failure."""
    made = [record(i, i / rate, 0.2 * slowdown * (1 + i % 4), 0.05 * slowdown * (1 + i % 3), 6 + i % 5)
            for i in range(12)]
    made.append(RequestRecord(12, "chat", 12 / rate, sent=12 / rate, error="HTTP 503"))
    return made


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert width >= 500 and height >= 300, (path, width, height)
    assert len(data) > 15_000, (path, len(data))  # axes, lines and text, not a blank canvas


def test_a_run_writes_cdf_and_timeline_pngs_and_the_report_links_them(tmp_path: Path) -> None:
    records = records_for(rate=2.0, slowdown=1.0)
    slo = SLO(ttft=0.5, tpot=0.1)
    run = {"target": "http://127.0.0.1:8000", "workload": "chat", "config": {"rate": 2.0, "burstiness": 1.0},
           "server_metrics": {}}
    path = tmp_path / "run.json"
    text = write_run(path, run, records, summarize(records, slo))
    pngs = [tmp_path / "run-cdf.png", tmp_path / "run-timeline.png"]
    for png in pngs:
        assert_png(png)
        assert f"]({png.name})" in text  # relative links, beside the .md
    assert path.with_suffix(".md").read_text() == text
    assert "None: the target exports no pdserve metrics." in text  # a peer: an empty section

    for png in pngs:
        png.unlink()
    assert run_report(argparse.Namespace(run=path)) == 0
    for png in pngs:
        assert_png(png)
    assert "![Latency CDFs](run-cdf.png)" in path.with_suffix(".md").read_text()


def comparison() -> dict[str, object]:
    """Two targets over three rates (the last skipped for one), and a target that failed to start."""
    slo = SLO(ttft=0.5, tpot=0.12)
    targets: dict[str, object] = {}
    for name, slowdown in (("colocated", 1.0), ("disaggregated", 0.7)):
        points: list[dict[str, object]] = []
        for rate in (0.5, 1.0, 2.0):
            if name == "colocated" and rate == 2.0:
                points.append({"rate": rate, "skipped": "time budget", "slo_attainment": None})
                continue
            records = records_for(rate, slowdown * rate)
            summary = summarize(records, slo)
            points.append({"rate": rate, "requests": len(records), **summary.to_json(),
                           "records": [r.to_json() for r in records]})
        targets[name] = {"description": name, "points": points,
                         "max_rate_meeting_slo": 0.5 if name == "colocated" else 1.0}
    targets["vllm"] = {"description": "peer", "points": [], "error": "not installed"}
    return {"rates": [0.5, 1.0, 2.0], "workload": "chat", "slo": {"ttft": slo.ttft, "tpot": slo.tpot},
            "slo_basis": "given", "elapsed": 10.0, "targets": targets}


def test_a_comparison_writes_its_pngs_and_report_detects_the_kind(tmp_path: Path) -> None:
    result = comparison()
    assert cdf_rate(result) == 1.0  # the highest rate at which some target still met the goal
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(result))
    assert run_report(argparse.Namespace(run=path)) == 0
    text = path.with_suffix(".md").read_text()
    for kind in ("attainment", "goodput", "p90", "cdf"):
        png = tmp_path / f"compare-{kind}.png"
        assert_png(png)
        assert f"](compare-{kind}.png)" in text
    assert "Latency CDFs at 1 req/s" in text and "failed: not installed" in text

    neither = tmp_path / "other.json"
    neither.write_text("{}")
    assert run_report(argparse.Namespace(run=neither)) == 2


# Two scrapes of one process. Queue wait, delta per bucket: 2 in (0, 0.01], 4 in (0.01, 0.1],
# 2 in (0.1, 1], 2 above 1 s; sum 6.5 - 0.5 = 6.0 over 10. Prefill is labelled by nothing and KV
# send time by direction. The rest: counters, a gauge, a creation stamp and a foreign family.
BEFORE = """\
# TYPE pdserve_router_queue_seconds histogram
pdserve_router_queue_seconds_bucket{le="0.01"} 2.0
pdserve_router_queue_seconds_bucket{le="0.1"} 3.0
pdserve_router_queue_seconds_bucket{le="1.0"} 4.0
pdserve_router_queue_seconds_bucket{le="+Inf"} 4.0
pdserve_router_queue_seconds_count 4.0
pdserve_router_queue_seconds_sum 0.5
# TYPE pdserve_router_prefill_seconds histogram
pdserve_router_prefill_seconds_bucket{le="0.1"} 1.0
pdserve_router_prefill_seconds_bucket{le="0.5"} 1.0
pdserve_router_prefill_seconds_bucket{le="2.5"} 1.0
pdserve_router_prefill_seconds_bucket{le="+Inf"} 1.0
pdserve_router_prefill_seconds_count 1.0
pdserve_router_prefill_seconds_sum 0.05
# TYPE pdserve_worker_phase_seconds_total counter
pdserve_worker_phase_seconds_total{phase="prefill"} 1.0
pdserve_worker_phase_seconds_total{phase="decode"} 10.0
# TYPE pdserve_worker_requests_total counter
pdserve_worker_requests_total{outcome="finished"} 2.0
# TYPE pdserve_worker_kv_usage_ratio gauge
pdserve_worker_kv_usage_ratio 0.1
# TYPE pdserve_worker_phase_seconds_created gauge
pdserve_worker_phase_seconds_created{phase="decode"} 1.7e9
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running 3.0
"""
AFTER = """\
# TYPE pdserve_router_queue_seconds histogram
pdserve_router_queue_seconds_bucket{le="0.01"} 4.0
pdserve_router_queue_seconds_bucket{le="0.1"} 9.0
pdserve_router_queue_seconds_bucket{le="1.0"} 12.0
pdserve_router_queue_seconds_bucket{le="+Inf"} 14.0
pdserve_router_queue_seconds_count 14.0
pdserve_router_queue_seconds_sum 6.5
# TYPE pdserve_router_prefill_seconds histogram
pdserve_router_prefill_seconds_bucket{le="0.1"} 1.0
pdserve_router_prefill_seconds_bucket{le="0.5"} 5.0
pdserve_router_prefill_seconds_bucket{le="2.5"} 11.0
pdserve_router_prefill_seconds_bucket{le="+Inf"} 11.0
pdserve_router_prefill_seconds_count 11.0
pdserve_router_prefill_seconds_sum 9.05
# TYPE pdserve_kv_transfer_seconds histogram
pdserve_kv_transfer_seconds_bucket{direction="send",le="0.01"} 1.0
pdserve_kv_transfer_seconds_bucket{direction="send",le="0.1"} 2.0
pdserve_kv_transfer_seconds_bucket{direction="send",le="+Inf"} 2.0
pdserve_kv_transfer_seconds_count{direction="send"} 2.0
pdserve_kv_transfer_seconds_sum{direction="send"} 0.06
# TYPE pdserve_worker_phase_seconds_total counter
pdserve_worker_phase_seconds_total{phase="prefill"} 3.0
pdserve_worker_phase_seconds_total{phase="decode"} 16.0
# TYPE pdserve_worker_requests_total counter
pdserve_worker_requests_total{outcome="finished"} 5.0
pdserve_worker_requests_total{outcome="aborted"} 1.0
# TYPE pdserve_worker_kv_usage_ratio gauge
pdserve_worker_kv_usage_ratio 0.2
# TYPE pdserve_worker_phase_seconds_created gauge
pdserve_worker_phase_seconds_created{phase="decode"} 1.7e9
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running 5.0
"""


def test_server_metric_deltas_and_bucket_percentiles_by_hand() -> None:
    samples = [parse_metrics(f"# TYPE pdserve_worker_kv_usage_ratio gauge\npdserve_worker_kv_usage_ratio {u}\n")
               for u in (0.3, 0.5, 0.7, 0.9)]
    section = source_delta(parse_metrics(BEFORE), parse_metrics(AFTER), samples)

    queue = section["histograms"]["pdserve_router_queue_seconds"]
    assert (queue["count"], queue["sum"]) == (10, pytest.approx(6.0))
    assert queue["mean"] == pytest.approx(0.6)
    # p50: rank 5 lies in (0.01, 0.1], which holds ranks 3..6: 0.01 + 0.09 * (5 - 2) / (6 - 2).
    assert queue["p50"] == pytest.approx(0.0775)
    # p90: rank 9 lies above the last finite bound: that bound, 1 s.
    assert queue["p90"] == pytest.approx(1.0)

    prefill = section["histograms"]["pdserve_router_prefill_seconds"]
    assert (prefill["count"], prefill["mean"]) == (10, pytest.approx(0.9))  # sum 9.05 - 0.05
    # Delta buckets: 0 up to 0.1, 4 in (0.1, 0.5], 6 in (0.5, 2.5]. p50: rank 5 in (0.5, 2.5]:
    # 0.5 + 2.0 * (5 - 4) / 6 = 0.8333; p90: rank 9: 0.5 + 2.0 * (9 - 4) / 6 = 2.1667.
    assert prefill["p50"] == pytest.approx(0.5 + 2 / 6)
    assert prefill["p90"] == pytest.approx(0.5 + 10 / 6)

    # Absent before: all of it is new. Rank 1 of 2 fills the first bucket: 0 + 0.01 * 1 / 1.
    send = section["histograms"]['pdserve_kv_transfer_seconds{direction="send"}']
    assert (send["count"], send["p50"], send["mean"]) == (2, pytest.approx(0.01), pytest.approx(0.03))

    assert section["counters"] == {
        'pdserve_worker_phase_seconds_total{phase="decode"}': 6.0,
        'pdserve_worker_phase_seconds_total{phase="prefill"}': 2.0,
        'pdserve_worker_requests_total{outcome="aborted"}': 1.0,
        'pdserve_worker_requests_total{outcome="finished"}': 3.0,
    }
    # 4 requests ended: 6 / 4 request-seconds of decode each, 2 / 4 of prefill.
    assert section["per_request"] == {"prefill_seconds": pytest.approx(0.5), "decode_seconds": pytest.approx(1.5)}
    # Sampled 0.3, 0.5, 0.7, 0.9: mean 0.6; p90 at rank 2.7: 0.7 + 0.7 * 0.2 = 0.84.
    assert section["gauges"] == {"pdserve_worker_kv_usage_ratio": {
        "before": 0.1, "after": 0.2, "mean": pytest.approx(0.6), "p50": pytest.approx(0.6),
        "p90": pytest.approx(0.84), "max": 0.9, "samples": 4}}


class FakeServer:
    """Serves fixed texts by path on loopback; ``pages`` may change while it runs."""

    def __init__(self, pages: dict[str, str]) -> None:
        self.pages = pages
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                body = fake.pages.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write((body or "not found").encode())

            def log_message(self, *_args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer({})
    yield server
    server.stop()


def test_the_recorder_scrapes_router_and_workers_and_skips_a_peer(fake: FakeServer) -> None:
    fake.pages.update({"/metrics": BEFORE, "/w1/metrics": BEFORE,
                       "/admin/workers": json.dumps({"workers": [
                           {"url": f"{fake.url}/w1", "role": "decode"},
                           {"url": f"{fake.url}/gone", "role": "prefill"}]})})
    with ServerMetricsRecorder(fake.url, sample_interval=0.02) as recorder:
        threading.Event().wait(0.15)  # the load: a few samples of the worker's gauges
        fake.pages.update({"/metrics": AFTER, "/w1/metrics": AFTER})
        threading.Event().wait(0.1)
    section = recorder.section
    assert section["router"]["histograms"]["pdserve_router_queue_seconds"]["count"] == 10
    (worker,) = section["workers"]
    assert (worker["url"], worker["role"]) == (f"{fake.url}/w1/metrics", "decode")
    assert worker["gauges"]["pdserve_worker_kv_usage_ratio"]["samples"] >= 2
    assert section["unreachable"] == [f"{fake.url}/gone/metrics"]
    assert headline(section)["queue_p90"] == pytest.approx(1.0)
    assert headline(section)["decode_mean"] == pytest.approx(1.5)

    fake.pages.clear()
    fake.pages["/metrics"] = "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1.0\n"
    with ServerMetricsRecorder(fake.url) as peer:
        pass
    assert peer.section == {}
    fake.pages.clear()  # no /metrics at all
    with ServerMetricsRecorder(fake.url) as bare:
        pass
    assert bare.section == {}


def test_the_comparison_table_shows_the_servers_view_per_point() -> None:
    result = comparison()
    targets = result["targets"]
    assert isinstance(targets, dict)
    point = targets["disaggregated"]["points"][0]
    point["server_metrics"] = {"router": source_delta(parse_metrics(BEFORE), parse_metrics(AFTER)),
                               "workers": [], "unreachable": [], "sample_interval": 1.0}
    text = compare_markdown(result)
    # queue p90 1000 ms, prefill p90 2167 ms, no KV transfer at the router, no workers scraped.
    assert "| disaggregated | 0.5 | 1000 | 2167 | - | - | - |" in text
