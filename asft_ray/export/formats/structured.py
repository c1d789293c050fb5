"""structured: remove MLP channels and KV groups (and, optionally, whole decoder layers) for a
smaller dense model (asft_ray/export/structured.py, plans from asft_ray/pruning/structured.py).

A safetensors model folder is exported one decoder layer at a time
(asft_ray/export/structured_streamed.py), a GGUF file or hub model loaded whole: the rule
`asft prune` streams by (models.is_safetensors_dir). Both give the same model."""

from __future__ import annotations

from pathlib import Path

from asft_ray.config import check_reconstruction
from asft_ray.errors import AsftError
from asft_ray.export.formats.registry import ExportFormat, ExportOptions, register


COST_DETAILS = ("cost_knobs", "cost_context", "cost_model", "cost_search", "search_cpus")  # read only with --cost-target


def check(model_spec: str, options: ExportOptions) -> None:
    if (options.drop_layers or options.refit or options.reconstruct_epochs) and options.nsamples < 1:
        raise AsftError("--drop-layers, --refit and --reconstruct-epochs measure on calibration data: pass --nsamples "
                        "(e.g. 32)")
    check_reconstruction(options.reconstruct_epochs, options.reconstruct_lr, flags=True)
    if options.cost_target is not None:
        _check_cost_options(options)
        if options.cost_search:  # enough validation text, before the cost model or any trial
            from asft_ray.export.structure_search import validation_ids

            validation_ids(model_spec, options)
    elif any(getattr(options, name) != ExportOptions.__dataclass_fields__[name].default for name in COST_DETAILS):
        raise AsftError("--cost-knobs, --cost-context, --cost-model, --cost-search and --search-cpus go with "
                        "--cost-target")
    from asft_ray.export.run import parse_ratio

    head_ratio = parse_ratio(options.head_ratio)
    if head_ratio == 0.0 and not options.drop_layers:
        return
    from asft_ray.models import model_config
    from asft_ray.pruning.structured import unit_counts

    cfg = model_config(model_spec)  # read once (a GGUF's takes seconds), before any weight
    layers = cfg.num_hidden_layers
    if head_ratio != 0.0:  # a shape transformers can load
        unit_counts(cfg, layers, 0.0, head_ratio)
    if options.drop_layers and not 0 < options.drop_layers < layers:
        raise AsftError(f"--drop-layers must be between 1 and {layers - 1} for a {layers}-layer model, "
                        f"got {options.drop_layers}")


def write(model_spec: str, out: Path, options: ExportOptions) -> dict:
    """Scores: |W|·‖X‖ over `nsamples` C4 windows, else weight magnitude. `drop_layers` whole decoder
    layers of lowest block influence go, and `refit` refits down_proj / o_proj by least squares on
    the kept channels and heads (both need calibration)."""
    from asft_ray.models import is_safetensors_dir, resolve_model

    if is_safetensors_dir(resolve_model(model_spec)):  # the rule `asft prune` streams by
        report = write_streamed(model_spec, out, options)
    else:
        report = write_in_memory(model_spec, out, options)
    if options.cost_search:
        from asft_ray.export.structure_search import finish

        finish(out)  # the chosen plan is written: its trials' measurements are in the report
    return report


def write_in_memory(model_spec: str, out: Path, options: ExportOptions) -> dict:
    from asft_ray.export.structured import save_structured, structure_in_memory
    from asft_ray.models import load_model

    settings, settings_report = _settings(model_spec, options, out)
    model, tokenizer = load_model(model_spec, options.device, show_progress=options.show_progress)
    report = structure_in_memory(model, _calibration(tokenizer, options), settings)
    return save_structured(model, tokenizer, out, {**report, **settings_report, "streamed": False})


def write_streamed(model_spec: str, out: Path, options: ExportOptions) -> dict:
    from asft_ray.export.structured_streamed import structure_streamed
    from asft_ray.models import load_tokenizer, resolve_model

    settings, settings_report = _settings(model_spec, options, out)
    tokenizer = load_tokenizer(model_spec)
    return structure_streamed(Path(resolve_model(model_spec).location), tokenizer, out, _calibration(tokenizer, options),
                              settings, settings_report, options.show_progress)


def _settings(model_spec: str, options: ExportOptions, out: Path):
    """The export's StructureSettings and what structured.json records of them: the ratios as given,
    or, with `cost_target`, as the cost-budget planner chose them (with its prediction and cost model)."""
    from asft_ray.export.run import parse_ratio
    from asft_ray.export.structured import StructureSettings

    mlp, heads, drop, cost_plan = parse_ratio(options.mlp_ratio), parse_ratio(options.head_ratio), options.drop_layers, None
    if options.cost_target is not None:
        cost_plan = _cost_plan(model_spec, options, out)
        mlp, heads, drop = cost_plan["mlp_ratio"], cost_plan["head_ratio"], cost_plan["drop_layers"]
    reconstruction = None
    if options.reconstruct_epochs:
        from asft_ray.pruning.reconstruct import Reconstruction

        reconstruction = Reconstruction(options.reconstruct_epochs, options.reconstruct_lr)
    settings = StructureSettings(mlp, heads, options.refit, drop, reconstruction)
    report = {"mlp_ratio": mlp, "head_ratio": heads, "nsamples": options.nsamples, "refit": options.refit,
              "scores": "wanda-style |W|*||X||" if options.nsamples > 0 else "magnitude |W|"}
    if reconstruction:
        report["reconstruction"] = {"epochs": reconstruction.epochs, "lr": reconstruction.lr}
    return settings, report if cost_plan is None else {**report, "cost_plan": cost_plan}


def _check_cost_options(options: ExportOptions) -> None:
    from asft_ray.export.run import parse_ratio
    from asft_ray.pruning.cost_budget import check_cost_request

    if parse_ratio(options.mlp_ratio) != 0 or parse_ratio(options.head_ratio) != 0 or options.drop_layers:
        raise AsftError("--cost-target chooses --mlp-ratio, --head-ratio and --drop-layers: give either it or them")
    knobs = check_cost_request(options.cost_target, options.cost_context, options.cost_knobs, "--cost-target",
                               "--cost-context")
    if "layers" in knobs and options.nsamples < 1:
        raise AsftError("--cost-knobs layers drops layers by block influence on calibration data: pass --nsamples")
    if options.cost_search < 0 or options.search_cpus <= 0:
        raise AsftError("--cost-search is a number of validation windows (0: off) and --search-cpus must be above 0")


def _cost_plan(model_spec: str, options: ExportOptions, out: Path) -> dict:
    """The cost-budget plan (pruning/cost_budget.py) for the model's shape, with the cost model of
    `cost_model` (calibrated on this machine first when that file does not exist; without one, this
    machine's calibration for the shape, kept in asft-ray's cache):
    the least aggressive one, or with `cost_search` the one measured best on validation (every feasible
    plan's measurement under `search`)."""
    from asft_ray.eval.cost_calibration import load_or_calibrate, machine_cost_model_path
    from asft_ray.eval.cost_model import DecoderShape
    from asft_ray.models import model_config
    from asft_ray.pruning.cost_budget import feasible_plans, parse_knobs, plan_for_cost

    dense = DecoderShape.from_config(model_config(model_spec))
    path = Path(options.cost_model).resolve() if options.cost_model else machine_cost_model_path(dense)
    cost_model = load_or_calibrate(path, dense, show_progress=options.show_progress)
    knobs = parse_knobs(options.cost_knobs)
    search = None
    if options.cost_search:
        from asft_ray.export.structure_search import search_plans

        plans = feasible_plans(dense, cost_model, options.cost_target, options.cost_context, knobs)
        chosen, rows = search_plans(model_spec, options, plans, out)
        plan = plans[chosen]
        search = {"windows": options.cost_search, "seqlen": options.seqlen, "split": "valid", "chosen": chosen,
                  "plans": rows}
    else:
        plan = plan_for_cost(dense, cost_model, options.cost_target, options.cost_context, knobs)
    return {"target": options.cost_target, "context": options.cost_context, "knobs": list(knobs),
            "mlp_ratio": plan.mlp_ratio, "head_ratio": plan.head_ratio, "drop_layers": plan.drop_layers,
            "predicted_relative_cost": plan.relative_cost, "predicted_seconds_per_token": plan.seconds_per_token,
            "dense_predicted_seconds_per_token": plan.dense_seconds_per_token,
            "cost_model": {"path": str(path), **cost_model.to_dict()},
            **({"search": search} if search else {})}


def _calibration(tokenizer, options: ExportOptions):
    """The C4 calibration windows, or None (magnitude scores) without `nsamples`."""
    if options.nsamples < 1:
        return None
    from asft_ray.data import c4_documents, sample_calibration

    return sample_calibration(c4_documents(options.data_dir), tokenizer, options.nsamples, options.seqlen, options.seed)


def describe(model_spec: str, out: Path, report: dict) -> str:
    line = (f"{model_spec} -> {out}: {report['after']['parameters']:,} parameters "
            f"({report['parameter_ratio']:.1%} of {report['before']['parameters']:,})")
    plan = report.get("cost_plan")
    if plan:
        line += (f"; planned for {plan['target']:g} x the dense cost per token: MLP ratio {plan['mlp_ratio']:.4g}, "
                 f"head ratio {plan['head_ratio']:.4g}, {plan['drop_layers']} layers dropped, predicted "
                 f"{plan['predicted_relative_cost']:.3f} x at {plan['context']} tokens of context")
        search = plan.get("search")
        if search:
            line += (f"; chosen of {len(search['plans'])} plans by validation ppl "
                     f"({search['plans'][search['chosen']]['val_ppl']:.3f} over {search['windows']} windows: "
                     + ", ".join(f"{row['val_ppl']:.3f}" for row in search["plans"]) + ")")
    return line


register(ExportFormat("structured", summary="remove MLP channels and KV groups", write=write, describe=describe,
                      check=check, options={"mlp_ratio", "head_ratio", "drop_layers", "refit", "reconstruct_epochs",
                                            "reconstruct_lr", "cost_target",
                                            "cost_knobs", "cost_context", "cost_model"}))
