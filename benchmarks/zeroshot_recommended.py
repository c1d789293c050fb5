"""Zero-shot accuracy of a pipeline run's recommended model next to its dense model (issue #16, acceptance 4).

    python benchmarks/zeroshot_recommended.py RUN_DIR [--limit 500]

Reads RUN_DIR/report.json (`asft run`), then runs the real CLI, one model after the other in this
order, `asft eval --task zeroshot --limit N --no-stream --json` for the dense model and for the
recommended one (the run's final model when the report keeps the dense model) (both loaded whole: the same scoring path for both), and appends one row per model
to benchmarks/results/zeroshot.jsonl with the run folder and which model it is. With --skip-dense the
dense model is not run again (zero-shot scoring is deterministic: its rows of 2026-11-28 and
2026-12-04 agree to every digit; compare with those).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import append_row, asft  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", help="an `asft run` folder holding report.json")
    parser.add_argument("--limit", type=int, default=500, help="items of each of the eight sets")
    parser.add_argument("--skip-dense", action="store_true", help="only the recommended (or final) model")
    opts = parser.parse_args()
    run = Path(opts.run).resolve()
    report = json.loads((run / "report.json").read_text())
    chosen, role = report.get("recommended"), "recommended"
    if not chosen:  # "keep the dense model": the run's final model next to it instead, said so in the rows
        chosen = next(c for c in report["recommendation"]["candidates"] if c["name"] == report["final_model"])
        role = "final (none recommended: " + report["recommendation"]["verdict"] + ")"
    path = Path(chosen["path"])
    models = {"dense": report["model"], f"{role}: {chosen['name']}": str(path if path.is_absolute() else run / path)}
    if opts.skip_dense:
        del models["dense"]
    for role, model in models.items():
        out = asft("eval", "--model", model, "--task", "zeroshot", "--limit", str(opts.limit), "--no-stream",
                   "--json", "--no-progress")
        result = json.loads(out.strip().splitlines()[-1])
        append_row("zeroshot", {"command": f"asft eval --model {model} --task zeroshot --limit {opts.limit} --no-stream --json",
                                "run": str(run), "role": role, **result})


if __name__ == "__main__":
    main()
