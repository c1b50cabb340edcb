"""Per-step timing of the demo: wall time, CPU load at the start, ran or reused; kept in OUT/timings.json."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator


def load_average() -> float | None:
    """1-minute load average (other processes on the 2 cores make every timing pessimistic); None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


class StepTimer:
    """Times named steps and persists them, so a resumed demo still reports what the earlier run measured."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self.records = json.loads(self.path.read_text())

    @contextlib.contextmanager
    def step(self, name: str, title: str) -> Iterator[dict[str, Any]]:
        """Context for one step; set `info["status"] = "reused"` inside when its outputs already existed."""
        load = load_average()
        print(f"\n=== {name}: {title} (load average {load}) ===", flush=True)
        info: dict[str, Any] = {"status": "ran"}
        start = time.perf_counter()
        yield info
        seconds = round(time.perf_counter() - start, 1)
        if info["status"] == "reused" and name in self.records:
            previous = dict(self.records[name])
            previous["reused_now"] = True
            self.records[name] = previous
            print(f"--- {name}: outputs exist, reused ({seconds} s; measured before: {previous.get('seconds')} s)")
        else:
            self.records[name] = {"title": title, "seconds": seconds, "load_start": load, "load_end": load_average(),
                                  "status": info["status"], **{k: v for k, v in info.items() if k != "status"}}
            print(f"--- {name}: {info['status']} in {seconds} s", flush=True)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.records, indent=1))
        tmp.replace(self.path)

    def total(self) -> float:
        return round(sum(r.get("seconds", 0.0) for r in self.records.values()), 1)
