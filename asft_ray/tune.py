"""`asft sweep`: search a per-layer sparsity schedule with Ray Tune (Optuna + ASHA).

Every trial prunes the dense model one-shot to the *same* global budget with a schedule
built from the trial's knobs (OWL lambda and M, one sparsity offset per block group,
an attention-vs-MLP offset, and optionally one offset per named linear such as
mlp.down_proj; the budget fit in asft_ray.schedules keeps the total exact),
then measures validation perplexity (WikiText-2 *valid*) one window at a time and reports
the running value after each window. ASHA compares trials at 1, 2, 4, ... windows and stops
the weak ones early; Optuna proposes the next knobs from the finished trials.

Output, in `out/`: the Tune experiment (`tune/`, resumable with Tuner.restore), a Parquet
table of all trials (`trials.parquet`), and the best schedule as a reusable YAML
(`best_schedule.yaml`, applied with `asft prune --schedule out/best_schedule.yaml`).
The best trial is chosen among trials that ran to the last window, on validation data only.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from asft_ray.config import PruneConfig, check_field_types
from asft_ray.errors import AsftError
from asft_ray.schedules.owl import M_GRID

TRIALS = "trials"  # streamed trials' pruned models, under the sweep folder while they run


@dataclass(frozen=True)
class SweepConfig:
    prune: PruneConfig  # model, method, sparsity (the global budget), calibration; its out is the sweep folder
    trials: int = 16
    concurrency: int = 2  # trials at once, each with cpus_per_trial CPUs
    cpus_per_trial: float = 1
    val_windows: int = 4  # validation windows of seqlen tokens: ASHA's time axis
    groups: int = 3  # block groups with their own sparsity offset
    max_group_offset: float = 0.1
    max_attn_offset: float = 0.15
    max_owl_lambda: float = 0.25
    linear_offsets: tuple[str, ...] = ()  # linears (names inside a layer) that get an offset knob of their own
    max_linear_offset: float = 0.15
    search_seed: int = 0

    @staticmethod
    def from_dict(values: dict, source: str = "config") -> "SweepConfig":
        if not isinstance(values, dict):
            raise AsftError(f"{source}: expected a mapping of settings")
        values = dict(values)
        own = {f.name for f in dataclasses.fields(SweepConfig)} - {"prune"}
        mine = {k: values.pop(k) for k in list(values) if k in own}
        check_field_types(mine, SweepConfig, source)
        if "linear_offsets" in mine:
            mine["linear_offsets"] = tuple(mine["linear_offsets"])
        if "schedule" in values:
            raise AsftError(f"{source}: a sweep searches the schedule; remove `schedule`")
        prune = PruneConfig.from_dict(values, source)
        cfg = SweepConfig(prune=prune, **mine)
        if prune.parsed_pattern.kind != "unstructured":
            raise AsftError(f"{source}: a schedule sweep needs unstructured pruning")
        if cfg.trials < 1 or cfg.concurrency < 1 or cfg.val_windows < 1 or cfg.groups < 1:
            raise AsftError(f"{source}: trials, concurrency, val_windows and groups must be at least 1")
        if prune.sparsity <= 0:
            raise AsftError(f"{source}: a sweep needs a global sparsity above 0")
        return cfg

    def check_fits_model(self, model_config) -> None:
        """Every block group needs at least one layer."""
        n_layers = model_config.num_hidden_layers
        if self.groups > n_layers:
            raise AsftError(f"groups {self.groups} is more than the model's {n_layers} layers")


def search_space(cfg: SweepConfig) -> dict:
    from ray import tune

    space = {
        "owl_lambda": tune.uniform(0.0, cfg.max_owl_lambda),
        "owl_m": tune.choice(list(M_GRID)),
        "attn_offset": tune.uniform(-cfg.max_attn_offset, cfg.max_attn_offset),
    }
    for g in range(cfg.groups):
        space[f"group_{g}"] = tune.uniform(-cfg.max_group_offset, cfg.max_group_offset)
    for name in cfg.linear_offsets:
        space[linear_knob(name)] = tune.uniform(-cfg.max_linear_offset, cfg.max_linear_offset)
    return space


def linear_knob(name: str) -> str:
    """The search-space key of a linear's offset (no dots: Tune and Optuna use them in names and paths)."""
    return "linear_" + name.replace(".", "_")


def spec_from_trial(params: dict, cfg: SweepConfig):
    from asft_ray.schedules import ScheduleSpec

    return ScheduleSpec(name="owl", owl_lambda=float(params["owl_lambda"]), owl_m=float(params["owl_m"]),
                        attn_offset=float(params["attn_offset"]),
                        group_offsets=tuple(float(params[f"group_{g}"]) for g in range(cfg.groups)),
                        linear_offsets=tuple((n, float(params[linear_knob(n)])) for n in cfg.linear_offsets))


def trial(params: dict, model, calib_ids, val_ids, outliers, cfg: SweepConfig) -> None:
    """One Tune trial: prune a copy of the dense model with this schedule, report ppl window by window.
    With `model` None (a streamed model) the trial streams: see streamed_trial."""
    import copy

    import torch

    from asft_ray.eval.perplexity import window_nll
    from asft_ray.pruning.engine import prune_model
    from asft_ray.schedules import build_schedule

    torch.set_num_threads(max(1, int(cfg.cpus_per_trial)))
    if model is None:
        return streamed_trial(params, val_ids, outliers, cfg)
    pc = cfg.prune
    model = copy.deepcopy(model)
    plan = build_schedule(spec_from_trial(params, cfg), model, pc.sparsity, outliers)
    start = time.perf_counter()
    prune_model(model, pc.method, pc.parsed_pattern, plan, calib_ids, show_progress=False,
                true_sequential=pc.true_sequential, reconstruction=pc.reconstruction)
    _report_windows(lambda w: window_nll(model, val_ids, pc.seqlen, w), cfg, time.perf_counter() - start)


def streamed_trial(params: dict, val_ids, outliers, cfg: SweepConfig) -> None:
    """A trial on a streamed model: a one-shot streamed prune (asft_ray.prune.run_prune) into
    `OUT/trials/TRIAL`, then each validation window read through the pruned model one decoder layer
    at a time (so ASHA's early stop also saves the reads). The folder is removed when the trial ends;
    the sweep removes what stopped trials leave."""
    from ray import tune

    from asft_ray.eval.streamed import streamed_perplexity
    from asft_ray.prune import run_prune

    pc = cfg.prune
    folder = Path(pc.out) / TRIALS / tune.get_context().get_trial_id()
    sub = dataclasses.replace(pc, schedule=spec_from_trial(params, cfg).to_dict(), out=str(folder), stream=True,
                              overwrite=True, resume=False)
    start = time.perf_counter()
    run_prune(sub, show_progress=False, outliers=outliers)
    prune_s = time.perf_counter() - start

    def window(w: int) -> float:  # one window's mean NLL: the log of its perplexity
        ids = val_ids[:, w * pc.seqlen: (w + 1) * pc.seqlen]
        return math.log(streamed_perplexity(folder, ids, pc.seqlen, 1, show_progress=False)["ppl"])

    try:
        _report_windows(window, cfg, prune_s)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _report_windows(window_nll, cfg: SweepConfig, prune_s: float) -> None:
    """ASHA's time axis: the running validation ppl after each window."""
    from ray import tune

    nll = []
    for w in range(cfg.val_windows):
        nll.append(window_nll(w))
        tune.report({"val_ppl": math.exp(math.fsum(nll) / len(nll)), "windows": len(nll), "prune_s": prune_s})


def best_schedule_yaml(cfg: SweepConfig, params: dict, model, outliers, val_ppl: float) -> dict:
    """The best trial's schedule as explicit per-layer lists (custom), reusable without the sweep:
    one list per module type (attention, mlp), or one per linear when the sweep gave linears offsets."""
    from asft_ray.schedules import build_schedule, module_kind

    plan = build_schedule(spec_from_trial(params, cfg), model, cfg.prune.sparsity, outliers)
    layers = sorted(plan)
    if cfg.linear_offsets:
        lists = {"linears": {name: [round(plan[i][name], 6) for i in layers] for name in plan[layers[0]]}}
    else:  # every linear of a module type has the same sparsity within a layer
        lists = {kind: [round(next(s for n, s in plan[i].items() if module_kind(n) == kind), 6) for i in layers]
                 for kind in ("attention", "mlp")}
    return {"schedule": "custom", **lists, "global_sparsity": cfg.prune.sparsity,
            "meta": {"source": "asft sweep", "model": cfg.prune.model, "method": cfg.prune.method,
                     "val_ppl": val_ppl, "val_windows": cfg.val_windows, "trial_params": params}}


def dense_outliers(pc: PruneConfig, model, calib_ids, stream: bool, show_progress: bool) -> dict:
    """OWL's outlier ratios of the dense model: in memory, or read one decoder layer at a time."""
    from asft_ray.models import resolve_model
    from asft_ray.pruning.engine import LocalRunner, capture_layer0_inputs
    from asft_ray.pruning.streaming import StreamedLayers, build_skeleton
    from asft_ray.schedules.owl import layer_outlier_ratios

    layers = None
    if stream:
        model, reader = build_skeleton(Path(resolve_model(pc.model).location), load_head=False)
        layers = StreamedLayers(model, reader, None)
    runner = LocalRunner(*capture_layer0_inputs(model, calib_ids))
    if stream:
        layers.after_capture(model)  # the embeddings are not needed again
    return layer_outlier_ratios(model, runner, show_progress=show_progress, layer_store=layers)


def run_sweep(cfg: SweepConfig, show_progress: bool = True) -> dict:
    """Run (or resume) the sweep in cfg.prune.out. Call with Ray initialised."""
    import pandas as pd
    import torch
    import yaml
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from asft_ray.artifacts import write_json_atomic
    from asft_ray.data import c4_documents, resolve_data_dir, sample_calibration, wikitext2_ids
    from asft_ray.models import decoder_layers, load_model, load_tokenizer, model_config, model_skeleton, prunable_linears
    from asft_ray.distributed.placement import require_placeable, resource_ask

    pc = cfg.prune
    require_placeable("a sweep trial", resource_ask(cfg.cpus_per_trial))
    out = Path(pc.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data_dir = resolve_data_dir(pc.data_dir)
    stream = pc.streams()
    tokenizer = load_tokenizer(pc.model)
    if stream:  # trials prune and evaluate one decoder layer at a time; the driver holds a skeleton
        model = model_skeleton(model_config(pc.model))
    else:
        model, tokenizer = load_model(pc.model, "cpu", show_progress=show_progress)
    known = set(prunable_linears(decoder_layers(model)[0]))
    unknown = [name for name in cfg.linear_offsets if name not in known]
    if unknown:
        raise AsftError(f"linear_offsets: the model's layers have no linear {', '.join(unknown)} "
                        f"(they have {', '.join(sorted(known))})")
    calib_ids = sample_calibration(c4_documents(data_dir), tokenizer, pc.nsamples, pc.seqlen, pc.seed)
    val_ids = wikitext2_ids(tokenizer, "valid", data_dir)[:, : cfg.val_windows * pc.seqlen]
    if val_ids.shape[1] < cfg.val_windows * pc.seqlen:
        raise AsftError(f"the validation split has fewer than {cfg.val_windows} windows of {pc.seqlen} tokens")
    outliers = dense_outliers(pc, model, calib_ids, stream, show_progress)
    prepare_s = time.perf_counter() - start

    trainable = tune.with_resources(
        tune.with_parameters(trial, model=None if stream else model, calib_ids=calib_ids, val_ids=val_ids,
                             outliers=outliers, cfg=cfg),
        {"cpu": cfg.cpus_per_trial},
    )
    name = "tune"
    if tune.Tuner.can_restore(str(out / name)):
        tuner = tune.Tuner.restore(str(out / name), trainable=trainable, resume_errored=True)
    else:
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.val_windows, grace_period=1,
                                  reduction_factor=2)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric="val_ppl", mode="min", num_samples=cfg.trials, max_concurrent_trials=cfg.concurrency,
                search_alg=OptunaSearch(seed=cfg.search_seed), scheduler=scheduler,
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(out), verbose=1 if show_progress else 0),
        )
    grid = tuner.fit()
    shutil.rmtree(out / TRIALS, ignore_errors=True)  # what early-stopped streamed trials left
    sweep_s = time.perf_counter() - start - prepare_s

    rows = []
    for result in grid:
        if result.error or not result.metrics:
            rows.append({"trial": Path(result.path).name if result.path else None, "error": str(result.error)[:300]})
            continue
        m = result.metrics
        rows.append({"trial": m.get("trial_id"), "val_ppl": m["val_ppl"], "windows": m["windows"],
                     "stopped_early": m["windows"] < cfg.val_windows, "prune_s": m.get("prune_s"),
                     "seconds": m.get("time_total_s"), **{f"param_{k}": v for k, v in result.config.items()}})
    table = pd.DataFrame(rows)
    table.to_parquet(out / ".trials.parquet.tmp")
    (out / ".trials.parquet.tmp").replace(out / "trials.parquet")
    complete = [r for r in rows if r.get("windows") == cfg.val_windows]
    if not complete:
        raise AsftError("no trial ran to the last validation window; see trials.parquet")
    best = min(complete, key=lambda r: r["val_ppl"])
    params = {k[len("param_"):]: v for k, v in best.items() if k.startswith("param_")}
    schedule = best_schedule_yaml(cfg, params, model, outliers, best["val_ppl"])
    tmp = out / ".best_schedule.yaml.tmp"
    tmp.write_text(yaml.safe_dump(schedule, sort_keys=False))
    tmp.replace(out / "best_schedule.yaml")
    summary = {"inputs": {**pc.identity(), **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "prune"}},
               "trials": len(rows), "completed": len(complete),
               "stopped_early": sum(1 for r in rows if r.get("stopped_early")), "errors": sum(1 for r in rows if "error" in r),
               "best": best, "prepare_s": prepare_s, "sweep_s": sweep_s, "torch_threads": torch.get_num_threads(),
               "outliers": {str(k): v for k, v in outliers.items()}}
    write_json_atomic(out / "sweep.json", summary)
    return summary
