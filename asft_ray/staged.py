"""Staged pruning with quality gates: prune a step at a time, check, keep or roll back.

A run prunes the model to each target of `stages` in turn (stage k starts from stage k-1's
pruned model; zeros score lowest, so with score-based methods they stay pruned), then measures the gate metric on
held-out data (WikiText-2 *valid*, never the test split). A passing stage is saved under
`RUN/stages/`; a failing one is logged and discarded, the model rolls back to the last
passing stage (optionally one half-size step is tried) and the run stops. The final model,
in `RUN/model`, is a copy of the last passing stage's files: bit for bit what that stage saved.

With `gate.manual`, the run pauses after each stage until `asft approve RUN` (or
`asft reject RUN`); running the same config again continues. Everything the run decides goes
into the decision log (`decisions.jsonl` and `decisions.parquet`), and `state.json` makes
every step resumable after a kill.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from asft_ray.artifacts import (
    atomic_output_dir,
    check_out_location,
    read_json,
    refuse_foreign_folder,
    same_run,
    write_json_atomic,
)
from asft_ray.config import PruneConfig, check_field_types, check_keys
from asft_ray.errors import AsftError

RUN_STATE = "state.json"
APPROVAL = "approval.json"
LOG = "decisions.jsonl"


@dataclass(frozen=True)
class Gate:
    """Pass when the validation ppl is within every tolerance that is set."""

    max_ppl_ratio: float | None = None  # ppl <= ratio x dense ppl
    max_stage_increase: float | None = None  # ppl - previous passing stage's ppl <= this
    max_ppl: float | None = None  # an absolute ceiling
    manual: bool = False  # pause after each stage for `asft approve` / `asft reject`
    retry_smaller_step: bool = False  # on failure, try once halfway between the last passing stage and the failed one
    windows: int = 4  # validation windows of `seqlen` tokens
    split: str = "valid"

    def __post_init__(self):
        if self.split == "test":
            raise AsftError("the gate must not look at the test split: use split: valid")
        if self.split != "valid":
            raise AsftError(f"unknown gate split {self.split!r}: use valid")
        if not self.manual and all(v is None for v in (self.max_ppl_ratio, self.max_stage_increase, self.max_ppl)):
            raise AsftError("the gate needs a tolerance (max_ppl_ratio, max_stage_increase or max_ppl) or manual: true")
        for key in ("max_ppl_ratio", "max_stage_increase", "max_ppl"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise AsftError(f"gate {key} must be positive, got {value}")
        if self.windows < 1:
            raise AsftError(f"gate windows must be at least 1, got {self.windows}")

    def tolerances(self, dense: float, previous: float) -> list[tuple[float, str]]:
        """(limit, how it is computed) for every tolerance that is set: the one rule both
        `limit` and `check` read."""
        rules = [(self.max_ppl_ratio, lambda r: (r * dense, f"{r:g} x dense {dense:.3f} = {r * dense:.3f}")),
                 (self.max_stage_increase, lambda d: (previous + d, f"previous {previous:.3f} + {d:g} = {previous + d:.3f}")),
                 (self.max_ppl, lambda c: (c, f"ceiling {c:g}"))]
        return [rule(value) for value, rule in rules if value is not None]

    def limit(self, dense: float, previous: float) -> float | None:
        """The tightest ppl the tolerances allow (None when only a manual gate is set)."""
        limits = [limit for limit, _ in self.tolerances(dense, previous)]
        return min(limits) if limits else None

    def check(self, ppl: float, dense: float, previous: float) -> tuple[bool, str]:
        """(passed, the reason in words)."""
        said = [(ppl > limit, f"ppl {ppl:.3f} vs {how}") for limit, how in self.tolerances(dense, previous)]
        failures = [words for failed, words in said if failed]
        if failures:
            return False, "exceeds " + "; ".join(failures)
        return True, "within " + "; ".join(words for _, words in said) if said else "no tolerance set"


@dataclass(frozen=True)
class StagedConfig:
    prune: PruneConfig  # method, schedule, calibration...; its `out` is the run folder, its sparsity the last stage
    stages: tuple[float, ...]
    gate: Gate

    @staticmethod
    def from_dict(values: dict, source: str = "config") -> "StagedConfig":
        if not isinstance(values, dict):
            raise AsftError(f"{source}: expected a mapping of settings")
        values = dict(values)
        stages = _parse_stages(values.pop("stages", None), source)
        gate_values = values.pop("gate", None)
        if not isinstance(gate_values, dict):
            raise AsftError(f"{source}: a `gate:` mapping is required (e.g. max_ppl_ratio: 1.5, windows: 4)")
        check_keys(gate_values, Gate, source, "gate key")
        check_field_types(gate_values, Gate, f"{source} gate")
        gate = Gate(**gate_values)
        if "sparsity" in values:
            raise AsftError(f"{source}: a staged run takes `stages`, not `sparsity`")
        if str(values.get("pattern", "unstructured")) != "unstructured":
            raise AsftError(f"{source}: staged pruning needs the unstructured pattern (N:M fixes the sparsity)")
        values["sparsity"] = stages[-1]
        prune = PruneConfig.from_dict(values, source)
        from asft_ray.schedules import check_reachable

        for target in stages:
            check_reachable(prune.schedule_spec, target)
        return StagedConfig(prune, stages, gate)

    def identity(self) -> dict:
        return {"prune": self.prune.identity(), "stages": list(self.stages), "gate": dataclasses.asdict(self.gate)}


def _parse_stages(stages, source: str) -> tuple[float, ...]:
    """A list of increasing targets, or a step rule {start, step, stop}."""
    if isinstance(stages, dict):
        unknown = set(stages) - {"start", "step", "stop"}
        if unknown or not {"start", "step", "stop"} <= set(stages):
            raise AsftError(f"{source}: a stage rule needs exactly start, step and stop")
        if not all(_is_number(stages[k]) for k in ("start", "step", "stop")):
            raise AsftError(f"{source}: stage start, step and stop must be numbers, got {stages}")
        start, step, stop = (float(stages[k]) for k in ("start", "step", "stop"))
        if step <= 0:
            raise AsftError(f"{source}: stage step must be positive, got {step}")
        count = int(round((stop - start) / step)) + 1
        stages = [round(start + i * step, 6) for i in range(max(count, 0)) if start + i * step <= stop + 1e-9]
    if not isinstance(stages, (list, tuple)) or not stages:
        raise AsftError(f"{source}: `stages` must be a list of sparsities (e.g. [0.2, 0.35, 0.5]) or {{start, step, stop}}")
    if not all(_is_number(s) for s in stages):
        raise AsftError(f"{source}: stages must be numbers, got {list(stages)}")
    stages = tuple(float(s) for s in stages)
    if any(not 0 < s < 1 for s in stages):
        raise AsftError(f"{source}: every stage must be in (0, 1), got {list(stages)}")
    if any(b <= a for a, b in zip(stages, stages[1:])):
        raise AsftError(f"{source}: stages must increase strictly, got {list(stages)}")
    return stages


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class DecisionLog:
    """Every decision of a run, as JSON lines and as a Parquet table (both rewritten atomically)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        path = self.folder / LOG
        self.rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []

    def add(self, **row) -> dict:
        row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **row}
        self.rows.append(row)
        tmp = self.folder / f".{LOG}.tmp"
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))
        tmp.replace(self.folder / LOG)
        self._write_parquet()
        return row

    def _write_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = ("time", "stage", "event", "target", "achieved", "layer_sparsity", "metric", "value",
                   "threshold", "verdict", "reason", "seconds")
        table = pa.table({c: [r.get(c) for r in self.rows] for c in columns})
        tmp = self.folder / ".decisions.parquet.tmp"
        pq.write_table(table, tmp)
        tmp.replace(self.folder / "decisions.parquet")


def decide(run_dir: str, decision: str, note: str = "") -> dict:
    """`asft approve` / `asft reject`: record the decision for the stage the run is waiting on."""
    run = Path(run_dir)
    state = read_json(run / RUN_STATE)
    if state is None:
        raise AsftError(f"{run_dir} is not a staged run (no {RUN_STATE})")
    pending = state.get("pending")
    if pending is None:
        raise AsftError(f"{run_dir} is not waiting for a decision")
    record = {"stage": pending["stage"], "decision": decision, "note": note,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(run / APPROVAL, record)
    return record


def check_run_folder(cfg: StagedConfig) -> str:
    """What a run may do with its folder: "new" (absent or empty), "continue" (this run's state)
    or "replace" (another staged run's, with overwrite). A folder that holds anything else is
    refused, overwrite or not: only what a staged run wrote is ever deleted. Cheap: call it
    before Ray starts."""
    run = Path(cfg.prune.out)
    check_out_location(run)
    if not run.exists() or not any(run.iterdir()):
        return "new"
    state = read_json(run / RUN_STATE)
    if state is None:
        refuse_foreign_folder(run)  # another asft-ray output may be replaced, anything else never
        if not cfg.prune.overwrite:
            raise AsftError(f"--out {run} already holds another asft-ray output; pass --overwrite to replace it")
        return "replace"
    if same_run(state.get("identity"), cfg.identity()):
        return "continue"
    if not cfg.prune.overwrite:
        raise AsftError(f"{run} holds a different staged run; pass overwrite: true (--overwrite) to replace it")
    return "replace"


def finished_result(cfg: StagedConfig) -> dict | None:
    """This very run's result when its folder says it finished, read without Ray or the model
    (asking again for a finished run, as `asft run` does when it continues, costs nothing);
    None when there is work left."""
    if check_run_folder(cfg) != "continue":
        return None
    state = RunState.read(Path(cfg.prune.out))
    return state.finished_result() if state is not None and state.finished else None


@dataclass
class RunState:
    """What `state.json` holds: everything a staged run has decided so far."""

    identity: dict
    dense: float | None = None  # the dense model's gate ppl
    passed: str | None = None  # the last passing stage (its folder under stages/), None: the dense model
    results: dict = dataclasses.field(default_factory=dict)  # stage name -> {target, achieved, value, seconds}
    pending: dict | None = None  # a manual gate's open question: {"stage": k, "previous": passed before it}
    failed: str | None = None
    outliers: dict | None = None  # OWL's dense outlier ratios, measured by the first stage
    finished: bool = False
    final: str | None = None

    @staticmethod
    def read(run: Path) -> "RunState | None":
        values = read_json(run / RUN_STATE)
        if values is None:
            return None
        known = {f.name for f in dataclasses.fields(RunState)}
        return RunState(**{k: v for k, v in values.items() if k in known})

    def write(self, run: Path) -> None:
        write_json_atomic(run / RUN_STATE, dataclasses.asdict(self))

    def finished_result(self) -> dict:
        """What a finished run returns, in the actor or read back from state.json by the driver."""
        return {"status": "finished", **dataclasses.asdict(self)}


class StagedRun:
    """One staged run in `cfg.prune.out`. Every stage is a one-shot prune (asft_ray.prune.run_prune)
    of the last passing stage's folder into `stages/NAME`, so a run never holds more of the model
    than that prune does (with streaming: one decoder layer), a rollback is only a choice of folder,
    and a stage interrupted mid-prune resumes from its own layer checkpoint."""

    def __init__(self, cfg: StagedConfig, show_progress: bool, make_runner, sum_gradients):
        from asft_ray.data import resolve_data_dir, wikitext2_ids
        from asft_ray.models import load_tokenizer

        self.cfg, self.show_progress = cfg, show_progress
        self.make_runner, self.sum_gradients = make_runner, sum_gradients
        self.run = Path(cfg.prune.out)
        self.stream = cfg.prune.streams()  # decided once, on the source model: every stage the same way
        self.resumable = cfg.prune.recipe.layerwise  # per-layer checkpoints
        gate, pc = cfg.gate, cfg.prune
        ids = wikitext2_ids(load_tokenizer(pc.model), gate.split, resolve_data_dir(pc.data_dir))
        self.val_ids = ids[:, : gate.windows * pc.seqlen]
        self.metric = f"wikitext2-{gate.split} ppl ({gate.windows}x{pc.seqlen})"
        self.log = DecisionLog(self.run)
        self.state = RunState.read(self.run)

    # -- models on disk -------------------------------------------------------------------
    def source(self) -> str:
        """The model the next stage prunes: the last passing stage, or the dense model."""
        passed = self.state.passed
        return self.cfg.prune.model if passed is None else str(self.run / "stages" / passed)

    def validation_ppl(self, spec: str) -> float:
        return self._measure(spec)[0]

    def _measure(self, spec: str, sparsity: bool = False) -> tuple[float, float | None]:
        """(gate ppl of the model `spec`, its measured sparsity if asked), streamed or in memory."""
        from asft_ray.eval.perplexity import perplexity
        from asft_ray.eval.sparsity import model_sparsity
        from asft_ray.models import load_model, resolve_model

        gate, pc = self.cfg.gate, self.cfg.prune
        if self.stream:
            from asft_ray.eval.streamed import streamed_perplexity

            location = Path(resolve_model(spec).location)
            measured = streamed_perplexity(location, self.val_ids, pc.seqlen, gate.windows, self.make_runner,
                                           show_progress=False, sparsity=sparsity)
            return measured["ppl"], measured["sparsity"]["total"] if sparsity else None
        model, _ = load_model(spec, pc.device, show_progress=False)
        ppl = perplexity(model, self.val_ids, pc.seqlen, gate.windows, show_progress=False)["ppl"]
        return ppl, model_sparsity(model)["total"] if sparsity else None

    def prune_stage(self, name: str, target: float) -> dict:
        """Prune the current source to `target` into stages/NAME and measure its gate ppl."""
        from asft_ray.artifacts import read_run
        from asft_ray.prune import run_prune

        t = time.perf_counter()
        folder = self.run / "stages" / name
        sub = dataclasses.replace(self.cfg.prune, model=self.source(), out=str(folder), sparsity=target,
                                  stream=self.stream, resume=self.resumable, overwrite=False)
        if folder.exists() and not same_run((read_run(folder) or {}).get("inputs"), sub.identity()):
            shutil.rmtree(folder)  # a stage this run wrote earlier and then discarded
        outliers = None if self.state.outliers is None else {float(m): r for m, r in self.state.outliers.items()}
        record = run_prune(sub, self.show_progress, self.make_runner, self.sum_gradients,
                           keep_zeros=True, outliers=outliers)
        if self.state.outliers is None and record["schedule"].get("outliers"):
            self.state.outliers = {str(m): r for m, r in record["schedule"]["outliers"].items()}
        return {"target": target, "achieved": record["sparsity"]["total"], "layer_sparsity": record["sparsity"]["layers"],
                "value": self.validation_ppl(str(folder)), "seconds": time.perf_counter() - t}

    def discard(self, name: str) -> None:
        shutil.rmtree(self.run / "stages" / name, ignore_errors=True)
        self.state.results.pop(name, None)

    # -- the gate ----------------------------------------------------------------------------
    def previous_ppl(self) -> float:
        passed = self.state.passed
        return self.state.dense if passed is None else self.state.results[passed]["value"]

    def threshold(self) -> float | None:
        return self.cfg.gate.limit(self.state.dense, self.previous_ppl())

    def rolled_back(self) -> str:
        return f"rolled back to {self.state.passed or 'dense'}"

    def record(self, name: str, stage: int, result: dict, event: str, verdict: str, reason: str) -> None:
        self.log.add(stage=stage, event=event, metric=self.metric, threshold=self.threshold(), verdict=verdict,
                     reason=reason, **result)
        if verdict != "fail":
            self.state.results[name] = {k: v for k, v in result.items() if k != "layer_sparsity"}

    def measure_dense(self) -> None:
        t = time.perf_counter()
        self.state.dense, achieved = self._measure(self.cfg.prune.model, sparsity=True)
        self.log.add(stage=0, event="dense", target=0.0, achieved=achieved, metric=self.metric,
                     value=self.state.dense, verdict="baseline", reason="dense model", seconds=time.perf_counter() - t)
        self.state.write(self.run)

    def settle_pending(self, k: int, target: float) -> str:
        """A manual gate's stage k: "wait" (no decision yet), "approved" or "rejected"."""
        pending = self.state.pending
        decision = read_json(self.run / APPROVAL)
        if decision is None or decision.get("stage") != k:
            return "wait"
        (self.run / APPROVAL).unlink()
        self.state.pending = None
        name = f"stage-{k:02d}"
        if decision["decision"] == "approve":
            self.state.passed = name
            self.log.add(stage=k, event="approve", target=target, verdict="approved", reason=decision.get("note") or "approved")
            self.state.write(self.run)
            return "approved"
        self.discard(name)
        self.state.passed = pending["previous"]
        self.log.add(stage=k, event="reject", target=target, verdict="rejected",
                     reason=f"{decision.get('note') or 'rejected'}; {self.rolled_back()}")
        self.state.write(self.run)
        return "rejected"

    def step(self, k: int, target: float) -> str:
        """Prune and gate stage k: "next" (passed), "wait" (manual gate) or "stop" (failed)."""
        gate, name = self.cfg.gate, f"stage-{k:02d}"
        result = self.prune_stage(name, target)
        passed, reason = gate.check(result["value"], self.state.dense, self.previous_ppl())
        if gate.manual:
            self.record(name, k, result, "stage", "pending", f"awaiting approval; automatic gate would say: {reason}")
            self.state.pending = {"stage": k, "previous": self.state.passed}  # not passing until approved
            self.state.write(self.run)
            return "wait"
        if passed:
            self.record(name, k, result, "stage", "pass", reason)
            self.state.passed = name
            self.state.write(self.run)
            return "next"
        self.record(name, k, result, "stage", "fail", f"{reason}; {self.rolled_back()}")
        self.discard(name)
        if gate.retry_smaller_step:
            self.retry(k, target)
        self.state.failed = name  # written last: a run killed before this repeats the stage (deterministic)
        self.state.write(self.run)
        return "stop"

    def retry(self, k: int, target: float) -> None:
        """One half-size step from the last passing stage towards the failed target."""
        last = self.state.results[self.state.passed]["target"] if self.state.passed else 0.0
        smaller, name = round((last + target) / 2, 6), f"stage-{k:02d}-retry"
        result = self.prune_stage(name, smaller)
        passed, reason = self.cfg.gate.check(result["value"], self.state.dense, self.previous_ppl())
        if passed:
            self.record(name, k, result, "retry", "pass", f"half step to {smaller:g}: {reason}")
            self.state.passed = name
        else:
            self.record(name, k, result, "retry", "fail", f"half step to {smaller:g}: {reason}; {self.rolled_back()}")
            self.discard(name)

    # -- the run -------------------------------------------------------------------------------
    def execute(self) -> dict:
        if self.state.finished:
            return self.state.finished_result()
        if self.state.dense is None:
            self.measure_dense()
        for k, target in enumerate(self.cfg.stages, start=1):
            if self.state.failed is not None:
                break  # the run stopped at a failed stage in an earlier call
            pending = self.state.pending
            if pending is not None and pending["stage"] == k:
                outcome = self.settle_pending(k, target)
                if outcome == "wait":
                    return {"status": "awaiting_approval", "stage": k, "run": str(self.run)}
                if outcome == "rejected":
                    break
                continue
            if f"stage-{k:02d}" in self.state.results:
                continue  # done in an earlier call
            outcome = self.step(k, target)
            if outcome == "wait":
                return {"status": "awaiting_approval", "stage": k, "run": str(self.run)}
            if outcome == "stop":
                break
        return self.finish()

    def finish(self) -> dict:
        """`RUN/model`: a byte copy of the last passing stage (or of the dense model if none passed)."""
        final, passed = self.run / "model", self.state.passed
        with atomic_output_dir(final) as tmp:
            _copy_model(self.source(), tmp, self.cfg.prune.device)
        result = self.state.results[passed] if passed else {"target": 0.0, "achieved": 0.0, "value": self.state.dense}
        self.log.add(stage=None, event="final", verdict="done", reason=f"final model = {passed or 'dense'}",
                     target=result["target"], achieved=result["achieved"], value=result["value"])
        self.state.finished, self.state.final = True, passed or "dense"
        self.state.write(self.run)
        return self.state.finished_result()


def _copy_model(spec: str, folder: Path, device: str) -> None:
    """The files of a model directory, copied byte for byte (a GGUF or hub model: loaded and saved)."""
    from asft_ray.models import load_model, resolve_model, save_model

    source = resolve_model(spec)
    if source.gguf_file or source.is_hub:
        save_model(*load_model(spec, device, show_progress=False), folder)
        return
    for item in Path(source.location).iterdir():
        if item.is_file() and not item.name.startswith("."):
            shutil.copy2(item, folder / item.name)


def run_staged(cfg: StagedConfig, show_progress: bool = True, make_runner=None, sum_gradients=None) -> dict:
    """Run (or continue) a staged run in `cfg.prune.out`. Returns {"status": finished | awaiting_approval, ...}."""
    from asft_ray.pruning.engine import LocalRunner, chunked_gradient_sums

    run = Path(cfg.prune.out)
    if check_run_folder(cfg) == "replace":
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    if RunState.read(run) is None:
        RunState(identity=cfg.identity()).write(run)
    return StagedRun(cfg, show_progress, make_runner or LocalRunner, sum_gradients or chunked_gradient_sums).execute()
