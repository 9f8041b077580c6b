"""KV transfer benchmark: the same code as ``pdserve bench transfer``.

    python benchmarks/transfer.py [--quick] [--link] [--sizes-mb 1,4,16,64,256] [--output PATH]
"""

from __future__ import annotations

import sys

from pdserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "transfer", *sys.argv[1:]]))
