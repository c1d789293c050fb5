"""Where benchmark scripts keep their rows: one JSON line per run in benchmarks/results/NAME.jsonl."""

import json
import math
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = RESULTS_DIR.parents[1]


def asft(*args: str) -> str:
    """Run the real CLI (`python -m asft_ray.cli ...`) from the repo root; its stdout, or exit on failure."""
    cmd = [sys.executable, "-m", "asft_ray.cli", *args]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def wikitext_ppl(model: str, windows: int | None = None, split: str = "test", seqlen: int = 2048) -> dict:
    """`asft eval --json` on WikiText-2 (the first `windows` windows; None: the whole split), parsed."""
    limit = ["--max-windows", str(windows)] if windows else []
    out = asft("eval", "--model", str(model), "--split", split, "--seqlen", str(seqlen), *limit, "--json", "--no-progress")
    return json.loads(out.strip().splitlines()[-1])


def window_ppl(nll: list[float]) -> float:
    """The paper protocol's perplexity of some windows: exp of the mean per-window NLL."""
    return math.exp(math.fsum(nll) / len(nll))


def read_rows(name: str) -> list[dict]:
    """Every row of results/NAME.jsonl (none when the file does not exist yet)."""
    path = RESULTS_DIR / f"{name}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(name: str, row: dict) -> dict:
    """Stamp the row with date and machine, append it to results/NAME.jsonl, print it, return it."""
    row = {"benchmark": name, "date": date.today().isoformat(), "machine": platform.node(), **row}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with (RESULTS_DIR / f"{name}.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=2), flush=True)
    return row


def peak_above_start(run) -> tuple:
    """(run(), by how many bytes this process's peak RSS rose above its RSS at the start of the call):
    the kernel's high-water mark (VmHWM), reset just before with /proc/self/clear_refs."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _proc_status_bytes("VmRSS")
    result = run()
    return result, _proc_status_bytes("VmHWM") - before


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)
