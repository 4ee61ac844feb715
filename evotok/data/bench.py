"""EvoShapes generation speed (rendering only, no disk)."""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path
from typing import Sequence

from evotok.data.evoshapes import EvoShapesParams, generate


def bench_data(resolutions: Sequence[int] = (32, 64), n: int = 4000, out_dir: str | Path = "results") -> dict:
    """Time generating ``n`` train images at each resolution; print a table, write
    ``out_dir/bench_data.json`` and return its dict."""
    rows = []
    for res in resolutions:
        params = EvoShapesParams(resolution=int(res))
        generate(params, "train", 0, 1)  # warm-up (imports, allocator)
        t0 = time.perf_counter()
        g = generate(params, "train", 0, int(n))
        dt = time.perf_counter() - t0
        rows.append({"resolution": int(res), "images": len(g.labels_NF), "seconds": round(dt, 4),
                     "images_per_s": round(len(g.labels_NF) / dt, 1)})
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
              "cpu_count": os.cpu_count(), "rows": rows}
    print(f"{'resolution':>10} {'images':>8} {'seconds':>9} {'images/s':>10}")
    for r in rows:
        print(f"{r['resolution']:>10} {r['images']:>8} {r['seconds']:>9.3f} {r['images_per_s']:>10.1f}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_data.json").write_text(json.dumps(result, indent=2))
    return result
