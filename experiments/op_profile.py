"""Where a compiled program's time goes: XLA's own per-operation events, summed by kind.

``traced(calls, fn)`` runs ``fn`` ``calls`` times under ``jax.profiler`` and returns the
operations' time per call, grouped by the HLO name stripped of its numeric suffix
(``ynn_fusion.87`` and ``ynn_fusion.113`` are both ``ynn_fusion``: matmul fusions handed to
YNNPACK on the CPU; ``copy_bitcast_fusion``: layout copies; ``dot``: XLA's own dots...). Runtime
bookkeeping (the thunk executor, the thread pool, Python frames) is left out, so the figures are
operation time summed over threads, which exceeds the wall time when operations run in parallel.
Used by ``experiments.bench --profile``.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

# Events that are the runtime's, not an operation's.
_RUNTIME_PREFIXES = ("ThunkExecutor", "Thunk", "Slinky", "$", "end: ")


def op_kind(name: str) -> str:
    """``"ynn_fusion.87"`` -> ``"ynn_fusion"``: an HLO name without its numeric suffix."""
    return re.sub(r"(\.\d+)+$", "", name)


def breakdown(events: Iterable[dict[str, Any]], calls: int) -> dict[str, float]:
    """Milliseconds per call by operation kind, largest first, from trace events."""
    total: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = str(e.get("name", ""))
        if not name or name.startswith(_RUNTIME_PREFIXES):
            continue
        total[op_kind(name)] += float(e["dur"])
    return {k: round(v / 1e3 / calls, 2) for k, v in total.most_common()}


def traced(calls: int, fn: Callable[[], Any]) -> dict[str, float]:
    """Runs ``fn`` (which must block until its result is ready) ``calls`` times under the
    profiler; returns ``breakdown`` of the trace.

    Raises:
      RuntimeError: the profiler wrote no trace to read.
    """
    import jax

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        try:
            for _ in range(calls):
                fn()
        finally:
            jax.profiler.stop_trace()
        paths = sorted(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True))
        if not paths:
            raise RuntimeError(f"the profiler wrote no trace under {d}")
        with gzip.open(paths[-1]) as f:
            events = json.load(f).get("traceEvents", [])
    return breakdown(events, calls)
