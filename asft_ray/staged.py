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

from asft_ray.artifacts import atomic_output_dir, check_out_location, refuse_foreign_folder, write_json_atomic
from asft_ray.config import PruneConfig, check_field_types, check_keys
from asft_ray.errors import AsftError

STATE = "state.json"
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

    def limit(self, dense: float, previous: float) -> float | None:
        """The tightest ppl the tolerances allow (None when only a manual gate is set)."""
        limits = [self.max_ppl_ratio * dense if self.max_ppl_ratio is not None else None,
                  previous + self.max_stage_increase if self.max_stage_increase is not None else None, self.max_ppl]
        limits = [x for x in limits if x is not None]
        return min(limits) if limits else None

    def check(self, ppl: float, dense: float, previous: float) -> tuple[bool, str]:
        """(passed, the reason in words)."""
        failures, limits = [], []
        if self.max_ppl_ratio is not None:
            limit = self.max_ppl_ratio * dense
            limits.append(f"ppl {ppl:.3f} vs {self.max_ppl_ratio:g} x dense {dense:.3f} = {limit:.3f}")
            if ppl > limit:
                failures.append(limits[-1])
        if self.max_stage_increase is not None:
            limit = previous + self.max_stage_increase
            limits.append(f"ppl {ppl:.3f} vs previous {previous:.3f} + {self.max_stage_increase:g} = {limit:.3f}")
            if ppl > limit:
                failures.append(limits[-1])
        if self.max_ppl is not None:
            limits.append(f"ppl {ppl:.3f} vs ceiling {self.max_ppl:g}")
            if ppl > self.max_ppl:
                failures.append(limits[-1])
        if failures:
            return False, "exceeds " + "; ".join(failures)
        return True, "within " + "; ".join(limits) if limits else "no tolerance set"


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
        if prune.stream:
            raise AsftError(f"{source}: staged pruning keeps the model in memory; stream is not supported")
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


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def decide(run_dir: str, decision: str, note: str = "") -> dict:
    """`asft approve` / `asft reject`: record the decision for the stage the run is waiting on."""
    run = Path(run_dir)
    state = _read_json(run / STATE)
    if state is None:
        raise AsftError(f"{run_dir} is not a staged run (no {STATE})")
    pending = state.get("pending")
    if pending is None:
        raise AsftError(f"{run_dir} is not waiting for a decision")
    record = {"stage": pending["stage"], "decision": decision, "note": note,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(run / APPROVAL, record)
    return record


def _save_stage(model, tokenizer, folder: Path, record: dict) -> None:
    from asft_ray.models import save_model

    with atomic_output_dir(folder) as tmp:
        save_model(model, tokenizer, tmp)
        write_json_atomic(tmp / "stage.json", record)


def _load_weights(model, folder: Path) -> None:
    """Put a saved stage's weights back into `model` (exact: the same float32 values)."""
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("embed" not in k and "lm_head" not in k for k in missing):
        raise AsftError(f"stage checkpoint {folder} does not match the model")


def _floor(model) -> dict:
    """Each linear's current fraction of zeros: a stage may only add to it."""
    from asft_ray.eval.sparsity import linear_sparsity
    from asft_ray.models import decoder_layers, prunable_linears

    return {(i, name): fraction for i, layer in enumerate(decoder_layers(model))
            for name, fraction in linear_sparsity(prunable_linears(layer))["linears"].items()}


def check_run_folder(cfg: StagedConfig) -> str:
    """What a run may do with its folder: "new" (absent or empty), "continue" (this run's state)
    or "replace" (another staged run's, with overwrite). A folder that holds anything else is
    refused, overwrite or not: only what a staged run wrote is ever deleted. Cheap: call it
    before Ray starts."""
    run = Path(cfg.prune.out)
    check_out_location(run)
    if not run.exists() or not any(run.iterdir()):
        return "new"
    state = _read_json(run / STATE)
    if state is None:
        refuse_foreign_folder(run)  # another asft-ray output may be replaced, anything else never
        if not cfg.prune.overwrite:
            raise AsftError(f"--out {run} already holds another asft-ray output; pass --overwrite to replace it")
        return "replace"
    if state.get("identity") == cfg.identity():
        return "continue"
    if not cfg.prune.overwrite:
        raise AsftError(f"{run} holds a different staged run; pass overwrite: true (--overwrite) to replace it")
    return "replace"


def run_staged(cfg: StagedConfig, show_progress: bool = True, make_runner=None, sum_gradients=None) -> dict:
    """Run (or continue) a staged run in `cfg.prune.out`. Returns {"status": finished | awaiting_approval, ...}."""
    from asft_ray.data import c4_documents, resolve_data_dir, sample_calibration, wikitext2_ids
    from asft_ray.eval.perplexity import perplexity
    from asft_ray.eval.sparsity import model_sparsity
    from asft_ray.models import load_model
    from asft_ray.prune import plan_sparsity
    from asft_ray.pruning.engine import LocalRunner, chunked_gradient_sums, prune_model

    make_runner = make_runner or LocalRunner
    sum_gradients = sum_gradients or chunked_gradient_sums
    pc, gate = cfg.prune, cfg.gate
    run = Path(pc.out)
    state = _read_json(run / STATE)
    if check_run_folder(cfg) == "replace":
        shutil.rmtree(run)
        state = None
    run.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = {"identity": cfg.identity(), "passed": None, "results": {}, "pending": None, "finished": False}
        write_json_atomic(run / STATE, state)
    log = DecisionLog(run)
    if state["finished"]:
        return {"status": "finished", **state}

    def save_state():
        write_json_atomic(run / STATE, state)

    data_dir = resolve_data_dir(pc.data_dir)
    model, tokenizer = load_model(pc.model, pc.device, show_progress=show_progress)
    val_ids = wikitext2_ids(tokenizer, gate.split, data_dir)[:, : gate.windows * pc.seqlen]
    metric = f"wikitext2-{gate.split} ppl ({gate.windows}x{pc.seqlen})"

    def evaluate() -> float:
        return perplexity(model, val_ids, pc.seqlen, gate.windows, show_progress=False)["ppl"]

    if "dense" not in state:
        t = time.perf_counter()
        state["dense"] = evaluate()
        log.add(stage=0, event="dense", target=0.0, achieved=model_sparsity(model)["total"], metric=metric,
                value=state["dense"], verdict="baseline", reason="dense model", seconds=time.perf_counter() - t)
        save_state()
    calib_ids = (sample_calibration(c4_documents(data_dir), tokenizer, pc.nsamples, pc.seqlen, pc.seed)
                 if pc.needs_calibration else None)
    if pc.schedule_spec.name == "owl" and "outliers" not in state:  # measured once, on the dense model
        from asft_ray.pruning.engine import capture_layer0_inputs
        from asft_ray.schedules.owl import layer_outlier_ratios

        runner = make_runner(*capture_layer0_inputs(model, calib_ids))
        state["outliers"] = {str(m): r for m, r in layer_outlier_ratios(model, runner, show_progress=show_progress).items()}
        save_state()
    outliers = {float(m): r for m, r in state["outliers"].items()} if "outliers" in state else None

    def restore_last_passing():
        if state["passed"] is None:
            fresh, _ = load_model(pc.model, pc.device, show_progress=False)
            model.load_state_dict(fresh.state_dict())
        else:
            _load_weights(model, run / "stages" / state["passed"])

    def prune_to(target: float) -> dict:
        t = time.perf_counter()
        sub = dataclasses.replace(pc, sparsity=target)
        sparsity, _ = plan_sparsity(sub, model, calib_ids, make_runner, show_progress, outliers, _floor(model))
        prune_model(model, pc.method, pc.parsed_pattern, sparsity, calib_ids, show_progress, pc.prune_lm_head,
                    make_runner, sum_gradients=sum_gradients, true_sequential=pc.true_sequential)
        measured = model_sparsity(model)
        ppl = evaluate()
        return {"target": target, "achieved": measured["total"], "layer_sparsity": measured["layers"], "value": ppl,
                "seconds": time.perf_counter() - t}

    def previous_ppl() -> float:
        return state["dense"] if state["passed"] is None else state["results"][state["passed"]]["value"]

    def threshold() -> float | None:
        return gate.limit(state["dense"], previous_ppl())

    def accept(name: str, stage: int, result: dict, event: str, verdict: str, reason: str):
        _save_stage(model, tokenizer, run / "stages" / name, result)
        log.add(stage=stage, event=event, metric=metric, threshold=threshold(), verdict=verdict, reason=reason, **result)
        state["results"][name] = {k: v for k, v in result.items() if k != "layer_sparsity"}
        state["passed"] = name

    if state["passed"] is not None:  # resume: continue from the last passing stage's exact weights
        _load_weights(model, run / "stages" / state["passed"])

    for k, target in enumerate(cfg.stages, start=1):
        name = f"stage-{k:02d}"
        pending = state["pending"]
        if name in state["results"] and (pending is None or pending["stage"] != k):
            continue  # done in an earlier call
        if pending is not None and pending["stage"] == k:
            decision = _read_json(run / APPROVAL)
            if decision is None or decision.get("stage") != k:
                return {"status": "awaiting_approval", "stage": k, "run": str(run)}
            (run / APPROVAL).unlink()
            state["pending"] = None
            if decision["decision"] == "approve":
                state["passed"] = name
                log.add(stage=k, event="approve", target=target, verdict="approved", reason=decision.get("note") or "approved")
                save_state()
                continue
            shutil.rmtree(run / "stages" / name, ignore_errors=True)
            state["results"].pop(name, None)
            state["passed"] = pending["previous"]
            log.add(stage=k, event="reject", target=target, verdict="rejected",
                    reason=f"{decision.get('note') or 'rejected'}; rolled back to {state['passed'] or 'dense'}")
            save_state()
            restore_last_passing()
            break
        result = prune_to(target)
        passed, reason = gate.check(result["value"], state["dense"], previous_ppl())
        if gate.manual:
            previous = state["passed"]
            accept(name, k, result, "stage", "pending", f"awaiting approval; automatic gate would say: {reason}")
            state["passed"] = previous  # not passing until approved
            state["pending"] = {"stage": k, "previous": previous}
            save_state()
            return {"status": "awaiting_approval", "stage": k, "run": str(run)}
        if passed:
            accept(name, k, result, "stage", "pass", reason)
            save_state()
            continue
        log.add(stage=k, event="stage", metric=metric, threshold=threshold(), verdict="fail",
                reason=f"{reason}; rolled back to {state['passed'] or 'dense'}",
                **result)
        state["failed"] = name
        save_state()
        restore_last_passing()
        if gate.retry_smaller_step:
            last = state["results"][state["passed"]]["target"] if state["passed"] else 0.0
            smaller = round((last + target) / 2, 6)
            result = prune_to(smaller)
            passed, reason = gate.check(result["value"], state["dense"], previous_ppl())
            if passed:
                accept(f"{name}-retry", k, result, "retry", "pass", f"half step to {smaller:g}: {reason}")
            else:
                log.add(stage=k, event="retry", metric=metric, threshold=threshold(), verdict="fail",
                        reason=f"half step to {smaller:g}: {reason}; rolled back to {state['passed'] or 'dense'}",
                        **result)
                restore_last_passing()
            save_state()
        break
    return _finish(run, state, log, model, tokenizer, pc)


def _finish(run: Path, state: dict, log: DecisionLog, model, tokenizer, pc: PruneConfig) -> dict:
    """`RUN/model`: a byte copy of the last passing stage (or the dense model if none passed)."""
    final = run / "model"
    with atomic_output_dir(final) as tmp:
        if state["passed"] is None:
            from asft_ray.models import save_model

            save_model(model, tokenizer, tmp)
        else:
            for item in (run / "stages" / state["passed"]).iterdir():
                shutil.copy2(item, tmp / item.name)
    final_stage = state["passed"] or "dense"
    log.add(stage=None, event="final", verdict="done", reason=f"final model = {final_stage}",
            target=state["results"][final_stage]["target"] if state["passed"] else 0.0,
            achieved=state["results"][final_stage]["achieved"] if state["passed"] else 0.0,
            value=state["results"][final_stage]["value"] if state["passed"] else state["dense"])
    state["finished"] = True
    state["final"] = final_stage
    write_json_atomic(run / STATE, state)
    return {"status": "finished", **state}
