"""Traffic and what serving it measured: request lengths, arrivals, per-request records, latency
statistics and SLOs, and the server's own Prometheus metrics.

Neutral ground: the load benchmarks (``bench/``) and the planner (``planner/``) both build on it,
and it imports neither.
"""
