"""The image tests share tests/delivery/support.py (run from this subdirectory by `make test-image`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
