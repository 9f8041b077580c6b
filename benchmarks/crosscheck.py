"""Compare `vllm bench serve` and `pdserve bench serve` run on the same workload against the same
server (benchmarks/run_comparison.sh, step 3): median TTFT and TPOT must agree within 10%.

    python benchmarks/crosscheck.py DIR   # DIR holds vllm_bench_serve.json and pdserve_bench_serve.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TOLERANCE = 0.10


def main() -> int:
    directory = Path(sys.argv[1])
    vllm_path, ours_path = directory / "vllm_bench_serve.json", directory / "pdserve_bench_serve.json"
    missing = [str(p) for p in (vllm_path, ours_path) if not p.exists()]
    if missing:
        print(f"# Cross-check\n\nNot run: missing {', '.join(missing)}.")
        return 1
    vllm = json.loads(vllm_path.read_text())
    ours = json.loads(ours_path.read_text())["summary"]
    rows = [
        ("median TTFT (ms)", vllm["median_ttft_ms"], ours["ttft"]["p50"] * 1000),
        ("median TPOT (ms)", vllm["median_tpot_ms"], ours["tpot"]["p50"] * 1000),
        ("median ITL (ms)", vllm["median_itl_ms"], ours["itl"]["p50"] * 1000),
    ]
    lines = [
        "# Cross-check: `vllm bench serve` vs `pdserve bench serve`, same server, same workload",
        "",
        f"{vllm.get('completed', '?')} and {ours['completed']} requests completed; 256 tokens in, 64 out, "
        "one request at a time, against one pdserve colocated on two cores.",
        "",
        "| metric | vllm bench serve | pdserve bench serve | difference | within 10% |",
        "|---|---:|---:|---:|---|",
    ]
    agree = True
    for name, theirs, mine in rows:
        difference = (mine - theirs) / theirs if theirs else float("inf")
        checked = "TTFT" in name or "TPOT" in name
        ok = abs(difference) <= TOLERANCE
        agree &= ok or not checked
        lines.append(f"| {name} | {theirs:.1f} | {mine:.1f} | {difference * 100:+.1f}% | "
                     f"{('yes' if ok else 'NO') if checked else '(not required)'} |")
    print("\n".join(lines) + "\n")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
