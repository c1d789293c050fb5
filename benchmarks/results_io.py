"""Where benchmark scripts keep their rows: one JSON line per run in benchmarks/results/NAME.jsonl."""

import json
import platform
from datetime import date
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def append_row(name: str, row: dict) -> dict:
    """Stamp the row with date and machine, append it to results/NAME.jsonl, print it, return it."""
    row = {"benchmark": name, "date": date.today().isoformat(), "machine": platform.node(), **row}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with (RESULTS_DIR / f"{name}.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=2), flush=True)
    return row
