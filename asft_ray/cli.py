"""`asft`: the command line. Thin: parse flags, build a config, call one recipe."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from asft_ray.artifacts import check_out_location
from asft_ray.config import PruneConfig, add_config_flags, check_device, config_from_args, flag_values, load_yaml
from asft_ray.errors import AsftError
from asft_ray.export.formats import ExportOptions, format_names, formats


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        print(f"asft: error: {message}", file=sys.stderr)
        sys.exit(2)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="asft", description="Adaptive sparse fine-tuning of LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="one-shot prune a causal LM and save it")
    p.add_argument("--config", help="YAML file with any of the settings below (flags override it)")
    add_config_flags(p, PruneConfig, skip=("data_dir", "device"))  # those two: _add_common
    _add_common(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or an embedded one)")
    p.add_argument("--json", action="store_true", help="print the run record as JSON")

    j = sub.add_parser("submit", help="submit a prune config as a Ray job to a cluster")
    j.add_argument("config", help="YAML run config (same keys as `asft prune`)")
    j.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="job server, e.g. http://127.0.0.1:8265")
    j.add_argument("--no-wait", action="store_true", help="return once submitted")
    j.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")

    s = sub.add_parser("staged", help="prune in stages, with a quality gate after each (see configs/staged-demo.yaml)")
    s.add_argument("config", help="YAML: the prune settings plus `stages:` and `gate:`")
    s.add_argument("--out", default=None, help="run folder (overrides the config's out)")
    s.add_argument("--overwrite", action="store_true", default=None, help="replace a run folder that holds a different run")
    s.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or an embedded one)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--json", action="store_true", help="print the run's state (state.json) as JSON")
    r = sub.add_parser("run", help="the whole pipeline from one YAML: staged prune -> recover -> export -> eval -> report")
    r.add_argument("config", help="YAML run config (see configs/demo.yaml)")
    r.add_argument("--out", default=None, help="run folder (overrides the config's out); an unfinished run there continues")
    r.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or an embedded one)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    w = sub.add_parser("sweep", help="search a per-layer schedule with Ray Tune (Optuna + ASHA) at a fixed global sparsity")
    w.add_argument("config", help="YAML: prune settings (model, method, sparsity, ...) plus trials, concurrency, val_windows, ...")
    w.add_argument("--out", default=None, help="sweep folder (overrides the config's out); an existing sweep there resumes")
    w.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or an embedded one)")
    w.add_argument("--no-progress", action="store_true", help="quiet")
    w.add_argument("--json", action="store_true", help="print the sweep's summary (best trial, timings) as JSON")
    for verb in ("approve", "reject"):
        a = sub.add_parser(verb, help=f"{verb} the stage a staged run with `gate: manual` is waiting on")
        a.add_argument("run", help="the staged run's folder")
        a.add_argument("--note", default="", help="why (goes into the decision log)")

    e = sub.add_parser("eval", help="perplexity and sparsity of a model")
    e.add_argument("--model", required=True)
    e.add_argument("--task", default="wikitext2", type=_eval_task,
                   help="wikitext2 (perplexity), zeroshot (all eight tasks) or a comma list of: piqa, arc_easy, "
                        "arc_challenge, boolq, hellaswag, winogrande, lambada, openbookqa")
    e.add_argument("--limit", type=int, default=None, help="zero-shot: only the first N items of each task")
    e.add_argument("--batch-size", type=int, default=16, help="zero-shot: requests per forward pass")
    e.add_argument("--split", default="test", choices=["test", "valid"])
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="one decoder layer in memory at a time (default: for safetensors model directories)")
    e.add_argument("--workers", type=int, default=0,
                   help="Ray actors the windows (or zero-shot requests) are sharded over (streamed)")
    e.add_argument("--worker-cpus", type=float, default=1, help="CPUs per evaluation actor")
    e.add_argument("--worker-gpus", type=float, default=0, help="GPUs per evaluation actor (fractions allowed)")
    e.add_argument("--address", default=None, help="Ray cluster address for --workers (default: $RAY_ADDRESS or an embedded one)")
    _add_common(e)
    e.add_argument("--json", action="store_true", help="print one JSON object")

    x = sub.add_parser("export", help="write a deployment form of a (pruned) model")
    x.add_argument("--model", required=True, help="alias, HF model dir, .gguf file or hub id")
    x.add_argument("--format", required=True, choices=format_names(),
                   help="; ".join(f"{name}: {fmt.summary}" for name, fmt in formats().items()))
    x.add_argument("--out", required=True, help="output directory (written atomically)")
    add_config_flags(x, ExportOptions, skip=("data_dir", "device", "show_progress"))  # _add_common, --no-progress
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    _add_common(x)
    x.add_argument("--json", action="store_true", help="print the report as JSON")

    from asft_ray.recovery.cli_args import add_recover_parser

    add_recover_parser(sub, _add_common)
    return parser


def _eval_task(value: str) -> str:
    """`--task`: wikitext2, zeroshot or a comma list of zero-shot tasks (checked while parsing)."""
    if value == "wikitext2":
        return value
    from asft_ray.eval.zeroshot_tasks import parse_tasks

    try:
        parse_tasks(value)
    except AsftError as err:
        raise argparse.ArgumentTypeError(f"invalid choice: {err}") from None
    return value


def _device(value: str) -> str:
    try:
        return check_device(value)
    except AsftError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="data folder, or 'hub' (default: $ASFT_DATA_DIR, ../shared/data)")
    p.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _prune(args) -> None:
    from asft_ray.artifacts import check_output_dir
    from asft_ray.data import resolve_data_dir
    from asft_ray.models import resolve_model

    cfg = config_from_args(args, PruneConfig)
    # Fail fast, before Ray starts, on everything that can be checked without the model's weights.
    resolve_model(cfg.model)
    if cfg.needs_calibration:
        resolve_data_dir(cfg.data_dir)
    if check_output_dir(cfg.out, cfg.identity(), cfg.overwrite):
        if args.json:
            from asft_ray.artifacts import read_run

            print(json.dumps({**read_run(cfg.out), "reused": True}, indent=2, sort_keys=True))
        else:
            print(f"{cfg.out} already holds this run; nothing to do (--overwrite to redo it)")
        return
    from asft_ray.prune import check_against_model_config

    check_against_model_config(cfg)
    from asft_ray.distributed.runner import prune_on_ray

    record = prune_on_ray(cfg, address=args.address, show_progress=not args.no_progress)
    if args.json:
        print(json.dumps(record, indent=2, sort_keys=True))
    else:
        t = record["timings"]
        print(
            f"pruned {cfg.model} with {cfg.method} {cfg.pattern} to {record['sparsity']['total']:.4f} sparsity "
            f"in {t['prune_s']:.1f}s (total {t['total_s']:.1f}s) -> {cfg.out}"
        )


def _config_values(args, overrides: tuple[str, ...] = ("out",)) -> dict:
    """The YAML config of a staged/sweep/run command, with the flags that override it."""
    values = load_yaml(args.config)
    if not isinstance(values, dict):
        raise AsftError(f"{args.config}: expected a mapping of settings, got {type(values).__name__}")
    for key in overrides:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return values


def _staged(args) -> None:
    from asft_ray.staged import StagedConfig

    values = _config_values(args, ("out", "overwrite"))
    cfg = StagedConfig.from_dict(values, source=args.config)  # every check that needs no model, before Ray starts
    from asft_ray.data import resolve_data_dir
    from asft_ray.distributed.runner import staged_on_ray
    from asft_ray.models import resolve_model
    from asft_ray.staged import check_run_folder

    check_run_folder(cfg)
    resolve_model(cfg.prune.model)
    resolve_data_dir(cfg.prune.data_dir)
    from asft_ray.prune import check_against_model_config

    check_against_model_config(cfg.prune, cfg.stages, seqlen_used=True)  # the gate measures seqlen windows
    result = staged_on_ray(values, address=args.address, show_progress=not args.no_progress)
    if args.json:
        print(json.dumps(result))
    elif result["status"] == "awaiting_approval":
        print(f"stage {result['stage']} is done and awaits a decision: asft approve {cfg.prune.out} "
              f"(or asft reject {cfg.prune.out}), then run this command again")
    else:
        print(f"finished: final model = {result['final']} -> {cfg.prune.out}/model "
              f"(decision log: {cfg.prune.out}/decisions.jsonl)")


def _run(args) -> None:
    from asft_ray.pipeline import RunConfig, run_pipeline

    cfg = RunConfig.from_dict(_config_values(args), source=args.config)
    result = run_pipeline(cfg, address=args.address, show_progress=not args.no_progress)
    if result["status"] == "finished":
        print(f"done: {result['report']}")


def _sweep(args) -> None:
    from asft_ray.tune import SweepConfig

    cfg = SweepConfig.from_dict(_config_values(args), source=args.config)
    from asft_ray.data import resolve_data_dir
    from asft_ray.distributed.runner import init_ray
    from asft_ray.models import model_config, resolve_model
    from asft_ray.tune import run_sweep

    check_out_location(cfg.prune.out)
    resolve_model(cfg.prune.model)
    resolve_data_dir(cfg.prune.data_dir)
    from asft_ray.prune import check_against_model_config

    check_against_model_config(cfg.prune, seqlen_used=True)  # validation windows of seqlen tokens
    cfg.check_fits_model(model_config(cfg.prune.model))
    owned = init_ray(args.address)
    try:
        if args.json:  # Tune prints tables: stdout stays the summary's
            import contextlib

            with contextlib.redirect_stdout(sys.stderr):
                summary = run_sweep(cfg, show_progress=not args.no_progress)
        else:
            summary = run_sweep(cfg, show_progress=not args.no_progress)
    finally:
        if owned:  # our embedded cluster: stop it (a cluster we joined is left running)
            import ray

            ray.shutdown()
    if args.json:
        print(json.dumps(summary, default=str))
        return
    best = summary["best"]
    print(f"{summary['trials']} trials ({summary['stopped_early']} stopped early by ASHA) in {summary['sweep_s']:.0f}s; "
          f"best validation ppl {best['val_ppl']:.3f} -> {cfg.prune.out}/best_schedule.yaml")


def _decide(args) -> None:
    from asft_ray.staged import decide

    record = decide(args.run, args.command, args.note)
    print(f"stage {record['stage']}: {args.command}d; run the staged config again to continue")


def _submit(args) -> None:
    from asft_ray.distributed.submit import submit

    if not args.address:
        raise AsftError("--address (or $RAY_ADDRESS) is required, e.g. http://127.0.0.1:8265")
    result = submit(args.config, args.address, wait=not args.no_wait, timeout_s=args.timeout)
    print(f"job {result['job_id']}: {result['status']}")


def _eval(args) -> None:
    from asft_ray.data import resolve_data_dir, wikitext2_ids
    from asft_ray.eval.perplexity import perplexity
    from asft_ray.eval.sparsity import model_sparsity
    from asft_ray.models import check_seqlen, load_model, model_config

    if args.workers < 0 or args.worker_cpus <= 0 or args.worker_gpus < 0:
        raise AsftError("--workers must be >= 0, --worker-cpus > 0 and --worker-gpus >= 0")
    if args.task != "wikitext2":
        return _eval_zeroshot(args)
    if args.seqlen < 2:
        raise AsftError(f"seqlen must be at least 2, got {args.seqlen}")
    if args.max_windows is not None and args.max_windows < 1:
        raise AsftError(f"--max-windows must be at least 1, got {args.max_windows}")
    source = _eval_source(args)
    check_seqlen(args.seqlen, model_config(args.model), "--seqlen")  # before any weight is read
    resolve_data_dir(args.data_dir)
    if source is not None:
        from asft_ray.eval.streamed import evaluate_streamed

        ids = wikitext2_ids(_tokenizer(source), args.split, args.data_dir)
        result = evaluate_streamed(source, ids, args.seqlen, args.max_windows, args.workers,
                                   (args.worker_cpus, args.worker_gpus), args.address, not args.no_progress,
                                   sparsity=True)
        sparsity = result.pop("sparsity")
    else:
        model, tokenizer = load_model(args.model, args.device, show_progress=not args.no_progress)
        ids = wikitext2_ids(tokenizer, args.split, args.data_dir)
        result = perplexity(model, ids, args.seqlen, args.max_windows, show_progress=not args.no_progress)
        sparsity = model_sparsity(model)
    result = {
        "model": args.model,
        "task": args.task,
        "split": args.split,
        **result,
        "sparsity": sparsity["total"],
        "sparsity_layers": sparsity["layers"],
    }
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(
            f"{args.model}: wikitext2 {args.split} ppl {result['ppl']:.3f} over {result['windows']} windows "
            f"of {args.seqlen} tokens, sparsity {result['sparsity']:.4f}"
        )


def _eval_source(args) -> str | None:
    """The model folder when `asft eval` streams (one decoder layer in memory at a time): by default
    for safetensors directories, and always with --workers; None when it loads the model whole."""
    from asft_ray.models import is_safetensors_dir, resolve_model

    source = resolve_model(args.model)
    stream = args.stream if args.stream is not None else is_safetensors_dir(source) or args.workers > 0
    if not stream:
        return None
    if not is_safetensors_dir(source):
        raise AsftError(f"streamed evaluation needs a local model directory with safetensors, not {args.model!r}")
    return source.location


def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _export(args) -> None:
    from asft_ray.export.formats import get_format
    from asft_ray.export.run import export_model

    options = flag_values(args, ExportOptions, {}, skip=("device",))
    report = export_model(args.model, args.format, args.out, overwrite=args.overwrite, device=args.device,
                          show_progress=not args.no_progress, **options)
    if args.json:
        print(json.dumps(report, sort_keys=True, default=str))
    else:
        print(get_format(args.format).describe(args.model, args.out, report))


def _eval_zeroshot(args) -> None:
    from asft_ray.eval.zeroshot import evaluate_tasks
    from asft_ray.eval.zeroshot_tasks import load_task, parse_tasks
    from asft_ray.models import load_model

    names = parse_tasks(args.task)
    if args.limit is not None and args.limit < 1:
        raise AsftError(f"--limit must be at least 1, got {args.limit}")
    source = _eval_source(args)
    load_task(names[0], args.data_dir, limit=1)  # fail on missing data before loading the model
    if source is not None:
        from asft_ray.eval.streamed import runner_factory
        from asft_ray.eval.streamed_zeroshot import streamed_evaluate_tasks

        with runner_factory(source, args.workers, (args.worker_cpus, args.worker_gpus), args.address) as make_runner:
            result = streamed_evaluate_tasks(Path(source), _tokenizer(source), names, args.data_dir, args.limit,
                                             make_runner=make_runner, show_progress=not args.no_progress)
    else:
        model, tokenizer = load_model(args.model, args.device, show_progress=not args.no_progress)
        result = evaluate_tasks(model, tokenizer, names, args.data_dir, args.limit, args.batch_size,
                                show_progress=not args.no_progress)
    result = {"model": args.model, "limit": args.limit, **result}
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return
    for name, r in result["tasks"].items():
        extra = "".join(f" {k} {r[k]:.4f}" for k in ("acc_norm", "ppl") if k in r)
        took = f" ({r['seconds']:.1f}s)" if "seconds" in r else ""
        print(f"{args.model}: {name} acc {r['acc']:.4f}{extra} over {r['n']} items{took}")
    streamed = f", streamed in {result['seconds']:.1f}s" if result.get("streamed") else ""
    print(f"{args.model}: mean acc {result['mean_acc']:.4f} over {len(names)} tasks{streamed}")


def _recover(args) -> None:
    from asft_ray.recovery.cli_args import recover_from_args

    recover_from_args(args)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds exactly as on Ctrl-C."""


_signals_received: list[int] = []  # SIGTERMs during the current command


def _raise_terminated(signum, frame):
    _signals_received.append(signum)  # ray.get turns any KeyboardInterrupt into a plain one: remember what it was
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers = {"prune": _prune, "submit": _submit, "eval": _eval, "export": _export, "staged": _staged,
                "approve": _decide, "reject": _decide, "sweep": _sweep, "run": _run, "recover": _recover}
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    _signals_received.clear()
    try:
        if args.command != "submit" and getattr(args, "address", None):  # submit's --address is a job server's URL
            from asft_ray.distributed.runner import check_cluster_reachable, check_ray_settings

            # a bad or unreachable cluster is one line before any other work (the model is not read)
            check_cluster_reachable(check_ray_settings(args.address))
        handlers[args.command](args)
    except AsftError as err:
        print(f"asft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C (130) or SIGTERM (143): temporary outputs are removed on the way out
        terminated = isinstance(stop, Terminated) or bool(_signals_received)
        print(f"asft: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
