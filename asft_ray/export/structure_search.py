"""Which structured plan meets a cost budget best: each feasible plan exported and measured on validation.

`plan_for_cost` takes, of the plans predicted to meet the cost target, the one that keeps the most
weights: it knows the cost of each plan, not its quality. With `--cost-search N`, the structured
export instead measures them: every feasible plan (pruning/cost_budget.feasible_plans: one per
choice of KV groups kept and layers dropped, each with the most MLP channels that meet the target)
is one Ray Tune trial with its own CPUs (`--search-cpus`). A trial exports its plan exactly as the
final export would (the same scores, refit and calibration), measures the perplexity of the first
N WikiText-2 *valid* windows of `seqlen` tokens, one decoder layer in memory at a time
(eval/streamed.py), and deletes its model. The plan with the lowest validation perplexity is
exported into `--out`; every plan's measurement goes into its report.

Resumable: each finished trial leaves `plan-K.json` in the search folder beside `--out`
(`.OUT.cost-search`), which a rerun with the same inputs reuses; the folder is removed when the
final export is written. A search folder of other inputs is replaced only if it holds the record
this module writes (`search.json`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from asft_ray.artifacts import write_json_atomic
from asft_ray.errors import AsftError

RECORD = "search.json"


def work_folder(out: Path) -> Path:
    """The trials' folder: beside `out`, which is written (atomically) only once the search has chosen."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.cost-search"


def plan_options(options, plan):
    """The export options that write `plan` (a CostPlan) with explicit ratios: no cost budget, no search."""
    from asft_ray.export.formats.registry import ExportOptions
    from asft_ray.export.formats.structured import COST_DETAILS

    defaults = {name: ExportOptions.__dataclass_fields__[name].default for name in ("cost_target", *COST_DETAILS)}
    return dataclasses.replace(options, **defaults, mlp_ratio=plan.mlp_ratio, head_ratio=plan.head_ratio,
                               drop_layers=plan.drop_layers, show_progress=False)


def search_plans(model_spec: str, options, plans: list, out: Path) -> tuple[int, list[dict]]:
    """Export and measure every plan (Ray Tune trials on the cluster `init_ray` joins or starts);
    returns the index of the plan with the lowest validation perplexity (the first on a tie) and one
    row per plan. The search folder stays until `finish(out)`."""
    import ray
    from ray import tune

    from asft_ray.data import resolve_data_dir
    from asft_ray.distributed.placement import require_placeable, resource_ask
    from asft_ray.distributed.runner import init_ray

    if Path(model_spec).exists():  # trials run in other processes and folders: absolute paths only
        model_spec = str(Path(model_spec).resolve())
    options = dataclasses.replace(options, data_dir=resolve_data_dir(options.data_dir))
    gpu = options.device.startswith("cuda")
    ask = resource_ask(options.search_cpus, 1 if gpu else 0)
    owned = init_ray(None)
    try:
        require_placeable("a cost-search trial", ask)
        val_ids = validation_ids(model_spec, options)
        work = _open_work(out, _search_key(model_spec, options, plans))
        trainable = tune.with_resources(
            tune.with_parameters(_trial, model_spec=model_spec, options=options, plans=plans, work=str(work),
                                 val_ids=val_ids),
            {"cpu": ask["CPU"], "gpu": ask["GPU"]})
        with contextlib.redirect_stdout(sys.stderr):  # Tune prints tables: stdout stays the export's (--json)
            grid = tune.Tuner(
                trainable, param_space={"plan": tune.grid_search(list(range(len(plans))))},
                tune_config=tune.TuneConfig(metric="val_ppl", mode="min"),
                run_config=tune.RunConfig(name="tune", storage_path=str(work / "tune"), verbose=0),
            ).fit()
    finally:
        if owned:  # our embedded cluster (a cluster we joined is left running)
            ray.shutdown()
    failed = [result.error for result in grid if result.error]
    if failed:
        raise AsftError(f"{len(failed)} of {len(plans)} cost-search trials failed; the first: {failed[0]}")
    rows = [json.loads((work / f"plan-{index}.json").read_text()) for index in range(len(plans))]
    best = min(range(len(plans)), key=lambda index: (rows[index]["val_ppl"], index))
    return best, rows


def validation_ids(model_spec: str, options):
    """The first `cost_search` windows of `seqlen` tokens of WikiText-2 valid; AsftError when the split is shorter."""
    from asft_ray.data import wikitext2_ids
    from asft_ray.models import load_tokenizer

    windows, seqlen = options.cost_search, options.seqlen
    ids = wikitext2_ids(load_tokenizer(model_spec), "valid", options.data_dir)[:, : windows * seqlen]
    if ids.shape[1] < windows * seqlen:
        raise AsftError(f"--cost-search {windows}: the validation split has fewer than {windows} windows of {seqlen} tokens")
    return ids


def finish(out: Path) -> None:
    """Remove the search folder once the chosen plan is written into `out`."""
    shutil.rmtree(work_folder(out), ignore_errors=True)


def _trial(config: dict, model_spec: str, options, plans: list, work: str, val_ids) -> None:
    """One plan: export it into the search folder, measure its validation perplexity, keep only the
    measurement (`plan-K.json`; reused when it is already there)."""
    import torch
    from ray import tune

    from asft_ray.eval.streamed import streamed_perplexity
    from asft_ray.export.formats.structured import write

    torch.set_num_threads(max(1, int(options.search_cpus)))
    index = config["plan"]
    work = Path(work)
    done = work / f"plan-{index}.json"
    if not done.is_file():
        folder = work / f"plan-{index}"
        shutil.rmtree(folder, ignore_errors=True)  # what an interrupted trial of this search left
        trial_options = plan_options(options, plans[index])
        if options.device.startswith("cuda"):
            trial_options = dataclasses.replace(trial_options, device="cuda")  # the GPU Ray gave this trial
        start = time.perf_counter()
        report = write(model_spec, folder, trial_options)
        export_s = time.perf_counter() - start
        ppl = streamed_perplexity(folder, val_ids, options.seqlen, show_progress=False)
        shutil.rmtree(folder)
        plan = plans[index]
        write_json_atomic(done, {
            "plan": index, "mlp_ratio": plan.mlp_ratio, "head_ratio": plan.head_ratio, "drop_layers": plan.drop_layers,
            "predicted_relative_cost": plan.relative_cost, "parameters": report["after"]["parameters"],
            "val_ppl": ppl["ppl"], "val_windows": ppl["windows"], "export_s": export_s, "eval_s": ppl["seconds"]})
    tune.report({"val_ppl": json.loads(done.read_text())["val_ppl"]})


def _search_key(model_spec: str, options, plans: list) -> str:
    """What the measurements depend on: the model, the export's options and the plans."""
    settings = {k: v for k, v in dataclasses.asdict(options).items() if k not in ("show_progress", "search_cpus")}
    text = json.dumps({"model": model_spec, "options": settings,
                       "plans": [(p.mlp_ratio, p.head_ratio, p.drop_layers) for p in plans]}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _open_work(out: Path, key: str) -> Path:
    """The search folder for these inputs: kept (a resumed search) when its record has the same key,
    replaced when it is one of ours for other inputs, refused when asft-ray did not write it."""
    work = work_folder(out)
    record = work / RECORD
    if work.exists():
        if not record.is_file():
            raise AsftError(f"{work} exists and is not an asft-ray cost search (no {RECORD}); remove it or choose "
                            "another --out")
        if json.loads(record.read_text()).get("key") == key:
            return work
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_json_atomic(record, {"key": key})
    return work
