"""``pdserve bench engine``: prefill and decode throughput of our engine beside HF transformers.

Each side runs in its own subprocess (``python -m pdserve.bench.engine --side ours|hf``) so its
resident-memory high-water mark is its own. The parent measures copy bandwidth (the decode floor:
a batch-1 step must stream every weight from memory once), joins the two sides' results, prints
one table and writes every raw number to JSON.

    plan.py         BenchPlan: what both sides measure, and their prompts
    measure.py      what a side records: timing entries, resident-memory high-water marks
    ours.py         our engine's side
    hf_baseline.py  HF transformers' side
    __main__.py     one side, in its own process
    run.py          the parent: both sides, the machine, the bandwidth floor
    report.py       the JSON report: floors, ratios, targets
    table.py        the Markdown table printed at the end

Speed targets (reported, never asserted; report.py):
    decode, batch 1:            >= 80 tokens/s
    decode, batch 32:           >= 3x HF transformers
    prefill, 2,048-token prompt: >= HF transformers in bfloat16
"""

