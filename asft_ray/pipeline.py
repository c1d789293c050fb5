"""`asft run CONFIG`: the whole pipeline from one YAML, every stage resumable, one run folder.

    RUN/prune/        staged pruning with gates (asft_ray.staged); the final model in RUN/prune/model
    RUN/structure/model  or, with `structure:` instead of `prune:`, a smaller dense model (MLP channels,
                      KV groups, whole layers removed; asft export --format structured)
    RUN/recover/      recovery fine-tuning of the pruned model (asft_ray.recovery), if `recover:` is set
    RUN/export/NAME/  deployment exports (`export: [compressed]`)
    RUN/int8/SOURCE/  with `int8: [dense, final]`: int8 copies (asft_ray/export/int8.py) of those models,
                      evaluated as the extra candidates dense+int8, pruned+int8 or recovered+int8
    RUN/eval/NAME.json  perplexity, zero-shot and speed of dense / pruned / recovered (/ +int8), measured here
    RUN/report.html, RUN/report.json  (with the recommendation: the cheapest model within `tolerance:`)

Each stage writes its output atomically and is skipped when that output is already there, so
running the same command after a kill (or after `asft approve`) continues where it stopped.
A candidate's `path` in report.json is a model folder that transformers' `from_pretrained` loads,
except an int8 one (`"int8": true`): that loads with asft_ray.models.load_model (`asft eval`), which
puts torch's int8 kernels in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from asft_ray.artifacts import check_out_location, write_json_atomic
from asft_ray.config import RECONSTRUCT_LR, check_field_types, check_keys, check_reconstruction
from asft_ray.errors import AsftError
from asft_ray.export.formats import run_format_names
from asft_ray.report.recommend import Tolerance


@dataclass(frozen=True)
class EvalSpec:
    ppl_windows: int | None = 4  # WikiText-2 test windows (None: the full test set)
    ppl_seqlen: int = 2048
    zeroshot: tuple[str, ...] = ()  # task names (asft_ray.eval.zeroshot_tasks), empty: none
    zeroshot_limit: int | None = 50  # items per task (None: all)
    speed_prompt: int = 128
    speed_new_tokens: int = 32
    speed_repeats: int = 3
    whole_model_max_gb: float = 4.0  # a safetensors model with more GiB of weights: never loaded whole, speed predicted

    @property
    def speed_context(self) -> int:
        """Tokens in the KV cache over the measured decode steps, on average (eval/cost_calibration.decode_cost)."""
        return self.speed_prompt + self.speed_new_tokens // 2

    def check(self, source: str = "eval") -> None:
        if self.whole_model_max_gb < 0:
            raise AsftError(f"{source}: whole_model_max_gb must be >= 0, got {self.whole_model_max_gb}")


@dataclass(frozen=True)
class StructureSpec:
    """`structure:` (instead of `prune:`): a smaller dense model, the form that is cheaper on a CPU
    or any dense runtime (asft export --format structured, scores |W|*||X|| on C4 calibration).

    What goes is given either as ratios (`mlp_ratio`, `head_ratio`, `drop_layers`) or as a cost
    budget: `cost_target` (e.g. 0.7: at most 70 % of the dense model's predicted seconds per
    generated token), and the structured planner (pruning/cost_budget.py) chooses the least
    aggressive ratios among `cost_knobs` that meet it, predicted by a decode-cost model calibrated
    on this machine once per run folder (RUN/structure/cost_model.json, or the file `cost_model`).
    With `cost_search: N` it measures every plan that meets the budget on N WikiText-2 valid windows
    instead, and keeps the best (export/structure_search.py)."""

    mlp_ratio: float = 0.0  # share of each layer's MLP channels removed
    head_ratio: float = 0.0  # share of each layer's KV groups (with their query heads) removed
    drop_layers: int = 0  # whole decoder layers removed, lowest block influence first
    cost_target: float | None = None  # instead of the three above: the predicted cost per token, a share of dense
    cost_knobs: tuple[str, ...] = ("mlp",)  # what the planner may remove: mlp, heads, layers
    cost_context: int | None = None  # KV-cache tokens the cost is predicted at; None: the evaluation's speed context
    cost_model: str | None = None  # fitted cost model JSON (calibrated there if missing); None: in the run folder
    cost_search: int = 0  # validation windows each feasible plan is measured on (0: the least aggressive plan)
    refit: bool = True  # least-squares refit of down_proj / o_proj on the kept channels and heads
    reconstruct_epochs: int = 0  # block reconstruction of each shrunk layer to the dense hidden states (0: off)
    reconstruct_lr: float = RECONSTRUCT_LR
    nsamples: int = 16  # C4 calibration windows
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "cost_knobs", tuple(self.cost_knobs))  # YAML gives a list

    def check(self, source: str = "structure") -> None:
        for name in ("mlp_ratio", "head_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise AsftError(f"{source}: {name} must be in [0, 1), got {getattr(self, name)}")
        if self.drop_layers < 0:
            raise AsftError(f"{source}: drop_layers must be >= 0, got {self.drop_layers}")
        ratios = self.mlp_ratio or self.head_ratio or self.drop_layers
        if self.cost_target is not None:
            from asft_ray.pruning.cost_budget import check_cost_request

            if ratios:
                raise AsftError(f"{source}: give either cost_target (the planner then chooses mlp_ratio, head_ratio "
                                "and drop_layers) or those, not both")
            check_cost_request(self.cost_target, self.cost_context, self.cost_knobs, f"{source}: cost_target",
                               f"{source}: cost_context")
        elif not ratios:
            raise AsftError(f"{source}: nothing to remove: set mlp_ratio, head_ratio or drop_layers, or cost_target")
        elif (self.cost_knobs, self.cost_context, self.cost_model, self.cost_search) != (("mlp",), None, None, 0):
            raise AsftError(f"{source}: cost_knobs, cost_context, cost_model and cost_search go with cost_target")
        if self.cost_search < 0:
            raise AsftError(f"{source}: cost_search is a number of validation windows (0: off), got {self.cost_search}")
        if self.nsamples < 1 or self.seqlen < 1:
            raise AsftError(f"{source}: nsamples and seqlen must be positive")
        check_reconstruction(self.reconstruct_epochs, self.reconstruct_lr, f"{source}: ")

    def describe(self) -> str:
        parts = [f"MLP channels -{100 * self.mlp_ratio:.3g} %" if self.mlp_ratio else "",
                 f"KV groups -{100 * self.head_ratio:.3g} %" if self.head_ratio else "",
                 f"{self.drop_layers} decoder layers removed" if self.drop_layers else ""]
        return (", ".join(p for p in parts if p) + (", least-squares refit" if self.refit else "")
                + (f", block reconstruction ({self.reconstruct_epochs} epoch{'s' * (self.reconstruct_epochs > 1)})"
                   if self.reconstruct_epochs else ""))


# What `int8:` may name: the run's models, or `final` (recovered if `recover:` is set, else pruned).
INT8_SOURCES = ("dense", "pruned", "recovered", "final")


@dataclass(frozen=True)
class RunConfig:
    model: str
    out: str
    prune: dict | None = None  # asft_ray.staged settings without model/out/data_dir/device: method, schedule, stages, gate, ...
    structure: StructureSpec | None = None  # instead of prune: remove whole channels, heads, layers
    recover: dict | None = None  # asft_ray.recovery settings without model/out/data_dir; `distill: true` uses the dense teacher
    export: tuple[str, ...] = ()
    int8: tuple[str, ...] = ()  # models whose int8 copy is an extra candidate: dense, pruned, recovered, final (see INT8_SOURCES)
    eval: EvalSpec = field(default_factory=EvalSpec)
    price_per_hour: float | None = None  # machine price for the cost per million tokens; None: "cost not computed"
    tolerance: Tolerance = field(default_factory=Tolerance)  # the quality the recommendation may give up
    data_dir: str | None = None
    device: str = "cpu"

    @staticmethod
    def from_dict(values: dict, source: str = "config") -> "RunConfig":
        """Validate everything that needs no model, including the nested stage configs."""
        check_keys(values, RunConfig, source)
        check_field_types(values, RunConfig, source, skip=("eval", "structure", "tolerance"))
        for key in ("model", "out"):
            if not values.get(key):
                raise AsftError(f"{source}: missing required key {key}")
        if bool(values.get("prune")) == bool(values.get("structure")):
            raise AsftError(f"{source}: give exactly one of prune (sparse weights) and structure (a smaller dense model)")
        values = dict(values)
        for key, cls in (("structure", StructureSpec), ("tolerance", Tolerance)):
            if values.get(key) is not None:
                check_keys(values[key], cls, f"{source} {key}", f"{key} key")
                check_field_types(values[key], cls, f"{source} {key}")
                values[key] = cls(**values[key])
                values[key].check(f"{source} {key}")
        if values.get("tolerance") is None:
            values.pop("tolerance", None)
        ev = dict(values.get("eval") or {})
        check_keys(ev, EvalSpec, f"{source} eval", "eval key")
        check_field_types(ev, EvalSpec, f"{source} eval", skip=("zeroshot",))
        if "zeroshot" in ev:
            from asft_ray.eval.zeroshot_tasks import parse_tasks

            tasks = ev["zeroshot"]
            if not (isinstance(tasks, str) or isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)):
                raise AsftError(f"{source} eval: key 'zeroshot' must be a task name or a list of them, got {tasks!r}")
            ev["zeroshot"] = tuple(parse_tasks(",".join(tasks) if isinstance(tasks, list) else tasks)) if tasks else ()
        values["eval"] = EvalSpec(**ev)
        values["eval"].check(f"{source} eval")
        exports = values.get("export") or ()
        offered = run_format_names()
        bad = [e for e in exports if e not in offered]
        if bad:
            raise AsftError(f"{source}: unknown export format(s) {', '.join(bad)}: choose from {', '.join(offered)}")
        values["export"] = tuple(exports)
        values["int8"] = tuple(values.get("int8") or ())
        _check_int8(values["int8"], values.get("recover") is not None, values.get("device", "cpu"), source)
        price = values.get("price_per_hour")
        if price is not None and (not isinstance(price, (int, float)) or price <= 0):
            raise AsftError(f"{source}: price_per_hour must be a positive number")
        cfg = RunConfig(**values)
        if cfg.prune is not None:
            cfg.staged_config()  # validates prune: (stages, gate, method...)
        if cfg.recover is not None:
            cfg.recover_config()
        return cfg

    def staged_config(self):
        from asft_ray.staged import StagedConfig

        if not isinstance(self.prune, dict):
            raise AsftError("prune must be a mapping")
        clash = sorted(set(self.prune) & {"model", "out", "data_dir", "device"})
        if clash:
            raise AsftError(f"prune: {', '.join(clash)} are set at the top level of a run config")
        return StagedConfig.from_dict({**self.prune, "model": self.model, "out": str(Path(self.out).resolve() / "prune"),
                                       "data_dir": self.data_dir, "device": self.device}, source="prune")

    @property
    def int8_sources(self) -> tuple[str, ...]:
        """The models `int8:` names, `final` resolved, each once, in the order given."""
        final = "recovered" if self.recover is not None else "pruned"
        return tuple(dict.fromkeys(final if name == "final" else name for name in self.int8))

    @property
    def pruned_dir(self) -> Path:
        """Where the first stage leaves its model: RUN/prune/model or RUN/structure/model."""
        return Path(self.out).resolve() / ("structure" if self.structure else "prune") / "model"

    def recover_config(self):
        from asft_ray.recovery.config import RecoverConfig

        values = dict(self.recover)
        distill = values.pop("distill", False)
        clash = sorted(set(values) & {"model", "out", "data_dir", "teacher"})
        if self.structure is not None and "dense" in values:
            clash.append("dense")  # a structured model has no zeros to keep: every weight trains
        if clash:
            raise AsftError(f"recover: {', '.join(clash)} are set by the pipeline (use distill: true for the dense teacher)")
        if self.structure is not None:
            values["dense"] = True
        run = Path(self.out).resolve()
        return RecoverConfig.from_dict({**values, "model": str(self.pruned_dir),
                                        "out": str(run / "recover"), "data_dir": self.data_dir,
                                        "teacher": self.model if distill else None}, source="recover")


def _check_int8(sources: tuple[str, ...], recover: bool, device: str, source: str) -> None:
    bad = [name for name in sources if name not in INT8_SOURCES]
    if bad:
        raise AsftError(f"{source}: int8: unknown model(s) {', '.join(map(str, bad))}: choose from {', '.join(INT8_SOURCES)}")
    if "recovered" in sources and not recover:
        raise AsftError(f"{source}: int8: recovered names the recovered model, but the config has no recover: section")
    if sources and device != "cpu":
        raise AsftError(f"{source}: int8 candidates run on torch's int8 CPU kernels, so every model is measured "
                        f"on the CPU: set device: cpu (got {device!r})")


def _log(message: str) -> None:
    print(f"[asft run {datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def evaluated_streamed(spec: str, ev: EvalSpec) -> bool:
    """Whether evaluate_model evaluates `spec` one decoder layer at a time: a safetensors folder with
    more weight bytes (read from the shards' headers) than ev.whole_model_max_gb GiB. An int8 export
    is always loaded whole: its kernels run on the whole model."""
    from asft_ray.export.int8 import is_int8_folder
    from asft_ray.models import is_safetensors_dir, resolve_model
    from asft_ray.pruning.streaming import SafetensorsReader

    source = resolve_model(spec)
    if not is_safetensors_dir(source) or is_int8_folder(source.location):
        return False
    return SafetensorsReader(source.location).weight_bytes() > ev.whole_model_max_gb * 2**30


def evaluate_model(spec: str, ev: EvalSpec, data_dir: str | None, device: str, folder: Path | None = None,
                   cost_model: Path | None = None) -> dict:
    """Perplexity, zero-shot accuracy and speed of one model, measured in this process. A model
    larger than ev.whole_model_max_gb (evaluated_streamed) is never loaded whole: its speed is
    predicted by the decode-cost model in `cost_model` (calibrated there first if missing)."""
    import torch

    threads = torch.get_num_threads()
    streamed = evaluated_streamed(spec, ev)
    if streamed:
        measured = _measure_streamed(spec, ev, data_dir, cost_model)
    else:
        measured = _measure_whole(spec, ev, data_dir, device)
    ppl, sparsity = measured["ppl"], measured["sparsity"]
    result = {"model": spec, "threads": threads, "ppl": ppl["ppl"], "ppl_windows": ppl["windows"],
              "ppl_seconds": ppl["seconds"], "sparsity": sparsity["total"], "sparsity_layers": sparsity["layers"]}
    if ev.zeroshot:
        result["zeroshot"] = measured["zeroshot"]
    result["speed"] = measured["speed"]
    if streamed:
        result["streamed"] = True
    if folder is not None:
        result["disk_mb"] = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20
    return result


def _measure_whole(spec: str, ev: EvalSpec, data_dir: str | None, device: str) -> dict:
    """The model loaded whole: every number measured on it."""
    from asft_ray.data import wikitext2_ids
    from asft_ray.eval.perplexity import perplexity
    from asft_ray.eval.sparsity import model_sparsity
    from asft_ray.eval.speed import measure_speed
    from asft_ray.models import load_model

    model, tokenizer = load_model(spec, device, show_progress=False)
    measured = {"ppl": perplexity(model, wikitext2_ids(tokenizer, "test", data_dir), ev.ppl_seqlen, ev.ppl_windows,
                                  show_progress=False),
                "sparsity": model_sparsity(model)}
    if ev.zeroshot:
        from asft_ray.eval.zeroshot import evaluate_tasks

        measured["zeroshot"] = evaluate_tasks(model, tokenizer, list(ev.zeroshot), data_dir, ev.zeroshot_limit)
    measured["speed"] = measure_speed(model, ev.speed_prompt, ev.speed_new_tokens, ev.speed_repeats, warmup=1)
    return measured


def _measure_streamed(spec: str, ev: EvalSpec, data_dir: str | None, cost_model: Path | None) -> dict:
    """A safetensors folder one decoder layer at a time (eval/streamed.py, eval/streamed_zeroshot.py),
    sparsity counted in the perplexity's pass; decode speed needs the whole model, so it is predicted."""
    from asft_ray.data import wikitext2_ids
    from asft_ray.eval.cost_calibration import load_or_calibrate
    from asft_ray.eval.cost_model import DecoderShape, predicted_speed
    from asft_ray.eval.streamed import streamed_perplexity
    from asft_ray.models import load_tokenizer, model_config, resolve_model

    folder, tokenizer = Path(resolve_model(spec).location), load_tokenizer(spec)
    ppl = streamed_perplexity(folder, wikitext2_ids(tokenizer, "test", data_dir), ev.ppl_seqlen, ev.ppl_windows,
                              show_progress=False, sparsity=True)
    sparsity = ppl.pop("sparsity")
    measured = {"ppl": ppl, "sparsity": sparsity}
    if ev.zeroshot:
        from asft_ray.eval.streamed_zeroshot import streamed_evaluate_tasks

        measured["zeroshot"] = streamed_evaluate_tasks(folder, tokenizer, list(ev.zeroshot), data_dir,
                                                       ev.zeroshot_limit)
    shape = DecoderShape.from_config(model_config(spec))
    measured["speed"] = {"prompt_len": ev.speed_prompt, "new_tokens": ev.speed_new_tokens,
                         **predicted_speed(load_or_calibrate(cost_model, shape), shape, ev.speed_context),
                         "cost_model": None if cost_model is None else str(cost_model)}
    return measured


def run_pipeline(cfg: RunConfig, address: str | None = None, show_progress: bool = True) -> dict:
    """Run (or continue) every stage; returns {"status": ..., "report": path}."""
    from asft_ray.data import resolve_data_dir
    from asft_ray.distributed.runner import init_ray, prune_object_store_bytes
    from asft_ray.models import check_seqlen, model_config, resolve_model

    run = Path(cfg.out).resolve()
    check_out_location(run)
    run.mkdir(parents=True, exist_ok=True)
    resolve_model(cfg.model)
    data_dir = resolve_data_dir(cfg.data_dir)
    started = time.perf_counter()
    store_bytes = None
    if cfg.prune is not None:
        from asft_ray.prune import check_against_model_config

        staged = cfg.staged_config()
        check_against_model_config(staged.prune, staged.stages, seqlen_used=True)
        store_bytes = prune_object_store_bytes(staged.prune)
    else:
        check_seqlen(cfg.structure.seqlen, model_config(cfg.model), "structure seqlen")
    check_seqlen(cfg.eval.ppl_seqlen, model_config(cfg.model), "eval ppl_seqlen")
    steps = []
    owned = init_ray(address, store_bytes)
    try:
        if cfg.prune is not None:
            _log("stage 1/5: staged pruning with gates")
            result = _staged_pruning(cfg, show_progress)
            if result["status"] != "finished":
                _log(f"pruning stage {result['stage']} awaits a decision: asft approve {run / 'prune'} (or reject), "
                     "then run this command again")
                return {"status": "awaiting_approval", "stage": result["stage"]}
        else:
            _log("stage 1/5: structured pruning (a smaller dense model)")
            result = _structured_pruning(cfg, data_dir)
        steps.append(result["step"])
        pruned_dir = cfg.pruned_dir
        final_name, final_dir, recovery = "pruned", pruned_dir, None
        if cfg.recover is not None:
            _log("stage 2/5: recovery fine-tuning")
            from asft_ray.recovery.recipe import run_recover

            rc = cfg.recover_config()
            recovery = run_recover(rc)
            final_name, final_dir = "recovered", Path(rc.out)
            steps.append(f"Fine-tuned {'every remaining weight' if rc.dense else 'the remaining weights'} for "
                         f"{rc.max_steps} steps of {rc.seqlen} tokens on C4 with DeepSpeed ZeRO on {rc.workers} "
                         "Ray Train workers" + (" with distillation from the dense model." if rc.teacher else "."))
        exports = {}
        for fmt in cfg.export:
            _log(f"stage 3/5: export {fmt}")
            exports[fmt] = _export(fmt, final_dir, run / "export" / fmt, cfg.device)
            steps.append(f"Exported the final model as {fmt}: {exports[fmt].get('summary', '')}")
        paths = {"dense": cfg.model, "pruned": str(pruned_dir)}
        if recovery:
            paths["recovered"] = str(final_dir)
        int8 = {}
        for source in cfg.int8_sources:
            _log(f"stage 3/5: int8 copy of {source}")
            out = run / "int8" / source
            int8[source] = _export("int8", paths[source], out, cfg.device)
            paths[f"{source}+int8"] = str(out)
            steps.append(f"Quantized {source} to int8 weights (one scale per output channel, torch's int8 weight-only "
                         f"CPU kernel), evaluated as the candidate {source}+int8: {int8[source]['summary']}.")
        _log(f"stage 4/5: evaluation ({', '.join(paths)})")
        _calibrate_cost_model(cfg, paths.values())
        models = {name: _evaluation(run / "eval" / f"{name}.json", spec, cfg, data_dir, name != "dense")
                  for name, spec in paths.items()}
    finally:
        if owned:
            import ray

            ray.shutdown()
    steps.append(f"Measured WikiText-2 test perplexity ({cfg.eval.ppl_windows or 'all'} windows), "
                 + (f"zero-shot accuracy on {', '.join(cfg.eval.zeroshot)} ({cfg.eval.zeroshot_limit or 'all'} items each), "
                    if cfg.eval.zeroshot else "")
                 + f"and decode speed ({cfg.eval.speed_prompt}-token prompt, {cfg.eval.speed_new_tokens} new tokens, "
                   f"median of {cfg.eval.speed_repeats}) for every model on this machine."
                 + _streamed_note(cfg, models))
    _log("stage 5/5: report")
    report = write_report(cfg, run, result, models, paths, final_name, recovery, exports, int8, steps,
                          time.perf_counter() - started)
    _log(f"report: {report}")
    return {"status": "finished", "report": str(report), "final": final_name}


def _streamed_note(cfg: RunConfig, models: dict) -> str:
    """What the report says about the models that were too large to load whole ("" if none was)."""
    names = [name for name, measured in models.items() if measured.get("streamed")]
    if not names:
        return ""
    return (f" {', '.join(names)} ({'has' if len(names) == 1 else 'have'} more than {cfg.eval.whole_model_max_gb:g} GiB "
            "of weights, eval.whole_model_max_gb) never went whole into memory: perplexity and zero-shot were computed "
            "one decoder layer at a time and the decode speed is predicted by the decode-cost model calibrated on "
            f"this machine ({run_cost_model(cfg)}), not measured.")


def _staged_pruning(cfg: RunConfig, show_progress: bool) -> dict:
    """Stage 1 with `prune:`: the staged run on the pruning actor, into RUN/prune."""
    from asft_ray.distributed.runner import staged_on_ray

    staged = cfg.staged_config()
    values = {**cfg.prune, "model": cfg.model, "out": staged.prune.out, "data_dir": cfg.data_dir, "device": cfg.device}
    result = staged_on_ray(values, show_progress=show_progress)
    p = staged.prune
    return {**result, "method": p.method,
            "step": f"Pruned with {p.method} ({p.schedule_spec.name} schedule, {p.nsamples} x {p.seqlen} C4 calibration "
                    f"tokens) in stages {', '.join(f'{100 * s:g} %' for s in staged.stages)}, gate on WikiText-2 valid; "
                    f"kept: {result.get('final')}."}


COST_MODEL = "cost_model.json"  # the decode-cost model calibrated on this machine, once per run folder


def run_cost_model(cfg: RunConfig) -> Path:
    """Where the run's decode-cost model is kept (calibrated on first use, for the first model that
    needs it): RUN/structure/cost_model.json (or `structure: {cost_model}`) when the structure stage
    plans for a cost budget, else RUN/eval/cost_model.json, for the speed of models evaluated
    layer by layer. One file per run, so a run calibrates once."""
    s, run = cfg.structure, Path(cfg.out).resolve()
    if s is not None and s.cost_target is not None:
        return Path(s.cost_model).resolve() if s.cost_model else run / "structure" / COST_MODEL
    return run / "eval" / COST_MODEL


def _structured_pruning(cfg: RunConfig, data_dir: str) -> dict:
    """Stage 1 with `structure:`: the structured export of the dense model into RUN/structure/model,
    in a fresh Ray worker process (the driver stays small); skipped when it is already there. With
    `cost_target`, the cost model is calibrated in that process too, once per run folder."""
    from asft_ray.artifacts import read_json
    from asft_ray.export.run import export_model
    from asft_ray.export.structured import REPORT

    s, out = cfg.structure, cfg.pruned_dir
    if read_json(out / REPORT) is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if s.cost_target is None:
            what = dict(mlp_ratio=s.mlp_ratio, head_ratio=s.head_ratio, drop_layers=s.drop_layers)
        else:
            what = dict(cost_target=s.cost_target, cost_knobs=",".join(s.cost_knobs),
                        cost_context=s.cost_context or cfg.eval.speed_context, cost_model=str(run_cost_model(cfg)),
                        cost_search=s.cost_search)
        _in_fresh_worker(export_model, cfg.model, "structured", out, **what, refit=s.refit, nsamples=s.nsamples,
                         reconstruct_epochs=s.reconstruct_epochs, reconstruct_lr=s.reconstruct_lr, seqlen=s.seqlen,
                         seed=s.seed, data_dir=data_dir, device=cfg.device, show_progress=False)
    return structure_summary(s, read_json(out / REPORT))


def structure_summary(s: StructureSpec, report: dict) -> dict:
    """Stage 1's entry in the report, from the export's structured.json: what was removed (the
    planner's choice with `cost_target`, with its predicted cost and the cost model it used)."""
    plan = report.get("cost_plan")
    if plan is not None:
        s = dataclasses.replace(s, mlp_ratio=plan["mlp_ratio"], head_ratio=plan["head_ratio"],
                                drop_layers=plan["drop_layers"], cost_target=None)
    before, after = report["before"]["parameters"], report["after"]["parameters"]
    step = (f"Removed whole structures ({s.describe()}) scored by |W|*||X|| on {s.nsamples} x {s.seqlen} C4 "
            f"calibration tokens: {before / 1e6:.1f} M -> {after / 1e6:.1f} M parameters "
            f"({100 * after / before:.1f} %), saved as a smaller dense model.")
    if plan is not None:
        search = plan.get("search")
        which = (f"of the {len(search['plans'])} plans predicted to meet it, the one with the lowest WikiText-2 valid "
                 f"ppl over {search['windows']} windows ({search['plans'][search['chosen']]['val_ppl']:.3f})"
                 if search else "the least aggressive plan")
        step += (f" The amounts were planned for a cost budget: {which} "
                 f"(knobs: {', '.join(plan['knobs'])}) predicted to cost at most {plan['target']:g} x the dense "
                 f"model per generated token at {plan['context']} tokens of context, predicted at "
                 f"{plan['predicted_relative_cost']:.3f} x by the decode-cost model {plan['cost_model']['path']}.")
    return {"status": "finished", "method": f"structured pruning ({s.describe()})",
            "what": f"made smaller by structured pruning ({s.describe()}): {before / 1e6:.1f} M -> {after / 1e6:.1f} M parameters",
            "step": step}


def _node_threads() -> int:
    """Nothing else of this run is busy when a stage runs in a fresh process: use every core of the
    node (Ray gives a task one thread per CPU it reserved, and a reservation can wait on actors
    Ray Train left behind)."""
    import ray

    return max(1, min(int(ray.cluster_resources().get("CPU", 1)), os.cpu_count() or 1))


def _in_fresh_worker(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh Ray worker process (one CPU reserved, the process exits after
    it) with torch on `_node_threads()` threads: the one way a stage (structure, calibration, each
    evaluation) runs outside the driver, each stage's peak memory its own."""
    import ray

    def run(threads: int, *args, **kwargs):
        import torch

        torch.set_num_threads(threads)
        return fn(*args, **kwargs)

    run.__name__ = fn.__name__
    return ray.get(ray.remote(num_cpus=1, max_calls=1)(run).remote(_node_threads(), *args, **kwargs))


def _calibrate_cost_model(cfg: RunConfig, specs) -> None:
    """The run's decode-cost model, calibrated for the first model evaluated layer by layer (none: no
    calibration) in a fresh Ray worker of its own, before the evaluations read it: the models it
    measures then never share a process with a streamed evaluation's memory (the two together put
    a 1.57 B Llama's evaluation at 25.3 % of its weight bytes; the evaluation alone at 15.2 %). None
    of them is measured whole when the model is above `whole_model_max_gb`, the size the run no
    longer loads whole (cost_calibration.measured_bytes_bound)."""
    from asft_ray.eval.cost_calibration import load_or_calibrate
    from asft_ray.eval.cost_model import DecoderShape
    from asft_ray.models import model_config

    path = run_cost_model(cfg)
    streamed = next((spec for spec in specs if evaluated_streamed(spec, cfg.eval)), None)
    if streamed is None or path.exists():
        return
    shape = DecoderShape.from_config(model_config(streamed))
    path.parent.mkdir(parents=True, exist_ok=True)  # RUN/eval: before the first evaluation makes it
    _in_fresh_worker(load_or_calibrate, path, shape, int(cfg.eval.whole_model_max_gb * 2**30))


def _evaluation(path: Path, spec: str, cfg: RunConfig, data_dir: str, on_disk: bool) -> dict:
    """One model's evaluation, cached in `path`; measured in a fresh Ray worker process so that
    each model's speed and peak memory are not disturbed by the models evaluated before it."""
    from asft_ray.artifacts import same_run
    from asft_ray.config import model_identity

    # the threshold only decides whether the model is streamed, which the key says itself
    settings = {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k != "whole_model_max_gb"}
    streamed = {"streamed": True} if evaluated_streamed(spec, cfg.eval) else {}
    key = json.loads(json.dumps({"model": model_identity(spec), "eval": settings, **streamed}))  # as it reads back
    cached = json.loads(path.read_text()) if path.exists() else None
    if cached is not None and same_run(cached.get("key"), key):
        return cached
    path.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    result = _in_fresh_worker(evaluate_model, spec, cfg.eval, data_dir, cfg.device, Path(spec) if on_disk else None,
                              run_cost_model(cfg))
    cached = {"key": key, **result, "seconds": time.perf_counter() - start}
    write_json_atomic(path, cached)
    return cached


def _export(fmt: str, model: Path | str, out: Path, device: str) -> dict:
    """`model` (a folder or the dense model's spec) in `fmt` (asft_ray/export/formats/), written once:
    a folder that holds the format's report is finished and kept. In this process, not a fresh worker:
    a format registered at run time in this process exists only here (tests/test_export_formats.py)."""
    from asft_ray.export.formats import get_format
    from asft_ray.export.run import export_model

    spec = get_format(fmt)
    report = spec.read_report(out)
    if report is None:
        export_model(str(model), fmt, out, device=device, overwrite=True, show_progress=False)
        report = spec.read_report(out)
        if report is None:
            raise AsftError(f"{out} is not a {fmt} export: it holds no readable report")
    report["summary"] = spec.run_summary(report, out)
    return report


def write_report(cfg: RunConfig, run: Path, first_stage: dict, models: dict, paths: dict, final_name: str,
                 recovery: dict | None, exports: dict, int8: dict, steps: list[str], seconds: float) -> Path:
    import asft_ray
    from asft_ray.report.html import build_report
    from asft_ray.staged import DecisionLog

    facts = {
        "run": str(run), "model": cfg.model, "method": first_stage["method"], "what": first_stage.get("what"),
        "final_model": final_name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": f"{platform.node()} ({platform.machine()})",
        "version": asft_ray.__version__, "steps": steps, "models": models, "price_per_hour": cfg.price_per_hour,
        "decisions": DecisionLog(run / "prune").rows if cfg.prune is not None else [],
        "recovery_evals": (recovery or {}).get("evals"),
        "exports": exports, "int8": int8, "ppl_split": "test", "ppl_seqlen": cfg.eval.ppl_seqlen, "pipeline_seconds": seconds,
        "zeroshot_note": f"log-likelihood scoring as lm-evaluation-harness does; first {cfg.eval.zeroshot_limit} items per task"
        if cfg.eval.zeroshot_limit else "log-likelihood scoring as lm-evaluation-harness does; all items",
        "speed_note": "Measured one after another in this run on this machine, each model in a fresh process (CPU, fp32, torch threads "
                      f"{models['dense'].get('threads')}). Unstructured zeros are stored as dense weights in memory, "
                      "so they do not speed up CPU decoding; only structured pruning or 2:4 kernels on a GPU do."
                      + (" The +int8 models run their decoder linears and head on torch's int8 weight-only kernel "
                         "(aten._weight_int8pack_mm, bfloat16 activations inside the matmul), the rest in fp32."
                         if int8 else ""),
        "recommendation": recommendation(cfg, run, models, paths),
    }
    chosen = facts["recommendation"]["recommended"]
    facts["recommended"] = None if chosen is None else {
        k: chosen[k] for k in ("name", "path", "int8", "ppl", "relative_cost", "cost_per_million") if k in chosen}
    write_json_atomic(run / "report.json", facts)
    html_text = build_report(facts)
    tmp = run / ".report.html.tmp"
    tmp.write_text(html_text, encoding="utf-8")
    tmp.replace(run / "report.html")
    return run / "report.html"


def recommendation(cfg: RunConfig, run: Path, models: dict, paths: dict) -> dict:
    """Every evaluated model as a candidate (asft_ray.report.recommend), the cheapest within the
    tolerance named; paths of the run's own models relative to the run folder."""
    from asft_ray.export.int8 import is_int8_folder
    from asft_ray.report.recommend import candidate_row, recommend

    dense = models["dense"]
    rows = []
    for name, measured in models.items():
        path = paths.get(name)
        int8 = path is not None and is_int8_folder(path)  # loads with asft_ray.models.load_model, not from_pretrained
        if path is not None and Path(path).is_absolute() and Path(path).is_relative_to(run):
            path = str(Path(path).relative_to(run))
        rows.append({**candidate_row(name, path, measured, dense, cfg.tolerance, cfg.price_per_hour), "int8": int8})
    return {"candidates": rows, "tolerance": dataclasses.asdict(cfg.tolerance),
            "ppl_bound": cfg.tolerance.max_ppl_ratio * dense["ppl"], **recommend(rows, cfg.tolerance, dense["ppl"])}
