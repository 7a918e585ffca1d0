"""Strict JSON for metrics.jsonl and every ``--json`` output: never NaN or Infinity.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which strict parsers (``jq``,
JavaScript, most other languages) reject. A non-finite number becomes ``null`` (a score over too
few items, a diverged loss), and the dump itself runs with ``allow_nan=False`` so that nothing
non-finite can slip through.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def json_safe(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by None and numpy scalars made plain."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` (``value``), refusing anything non-finite."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)
