from __future__ import annotations

import sys
from pathlib import Path

# Test helper modules (builders, fixtures_model, hf_reference, prompts) import by plain name.
sys.path.insert(0, str(Path(__file__).parent))

from fixtures_model import checkpoint  # noqa: E402,F401
from fixtures_native import native  # noqa: E402,F401
