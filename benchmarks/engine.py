"""Engine throughput beside HF transformers: the same code as ``pdserve bench engine``.

    python benchmarks/engine.py [--quick] [--skip-hf] [--dtype float32] [--output PATH]
"""

from __future__ import annotations

import sys

from pdserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "engine", *sys.argv[1:]]))
