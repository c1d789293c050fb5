"""`asft`: the command line. Thin: parse flags, build a config, call one recipe."""

from __future__ import annotations

import argparse
import json
import os
import sys

from asft_ray.config import METHODS, PruneConfig, load_yaml
from asft_ray.errors import AsftError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        print(f"asft: error: {message}", file=sys.stderr)
        sys.exit(2)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="asft", description="Adaptive sparse fine-tuning of LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="one-shot prune a causal LM and save it")
    p.add_argument("--config", help="YAML file with any of the settings below (flags override it)")
    p.add_argument("--model", help="alias (smollm2-135m), HF model dir, .gguf file or hub id")
    p.add_argument("--method", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--sparsity", type=float, help="fraction of decoder-linear weights to remove (implied by N:M)")
    p.add_argument("--pattern", help="unstructured (default), 2:4, 4:8 or any N:M")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 32; papers: 128)")
    p.add_argument("--seqlen", type=int, help="calibration window length (default 2048)")
    p.add_argument("--seed", type=int, help="calibration sampling seed (default 0)")
    p.add_argument("--prune-lm-head", action="store_true", default=None,
                   help="also prune lm_head (untied from the input embeddings, which stay dense)")
    p.add_argument("--stream", action="store_true", default=None,
                   help="never hold the whole model: stream decoder layers from safetensors (wanda, sparsegpt)")
    p.add_argument("--workers", type=int, help="Ray scoring actors (default 0: score inside the one pruning actor)")
    p.add_argument("--worker-cpus", type=float, help="CPUs per scoring actor (default 1)")
    p.add_argument("--worker-gpus", type=float, help="GPUs per scoring actor (default 0)")
    p.add_argument("--worker-memory-gb", type=float, help="memory Ray reserves per scoring actor")
    p.add_argument("--out", help="output model directory")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an --out that holds a different run")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue a killed wanda/sparsegpt run after its last finished layer")
    _add_common(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or an embedded one)")
    p.add_argument("--json", action="store_true", help="print the run record as JSON")

    j = sub.add_parser("submit", help="submit a prune config as a Ray job to a cluster")
    j.add_argument("config", help="YAML run config (same keys as `asft prune`)")
    j.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="job server, e.g. http://127.0.0.1:8265")
    j.add_argument("--no-wait", action="store_true", help="return once submitted")
    j.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")

    e = sub.add_parser("eval", help="perplexity and sparsity of a model")
    e.add_argument("--model", required=True)
    e.add_argument("--task", default="wikitext2", choices=["wikitext2"])
    e.add_argument("--split", default="test", choices=["test", "valid"])
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    _add_common(e)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="data folder, or 'hub' (default: $ASFT_DATA_DIR, ../shared/data)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _prune(args) -> None:
    from asft_ray.artifacts import check_output_dir
    from asft_ray.data import resolve_data_dir
    from asft_ray.models import resolve_model

    values = load_yaml(args.config) if args.config else {}
    for key in ("model", "method", "sparsity", "pattern", "nsamples", "seqlen", "seed", "out", "data_dir", "overwrite", "resume",
                "prune_lm_head", "stream", "workers", "worker_cpus", "worker_gpus", "worker_memory_gb"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.device != "auto" or "device" not in values:
        values["device"] = args.device
    cfg = PruneConfig.from_dict(values, source=args.config or "flags")
    # Fail fast, before Ray starts, on everything that can be checked without the model.
    resolve_model(cfg.model)
    if cfg.method != "magnitude":
        resolve_data_dir(cfg.data_dir)
    if check_output_dir(cfg.out, cfg.identity(), cfg.overwrite):
        print(f"{cfg.out} already holds this run; nothing to do (--overwrite to redo it)")
        return

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
    from asft_ray.models import load_model, resolve_model

    if args.seqlen < 2:
        raise AsftError(f"seqlen must be at least 2, got {args.seqlen}")
    if args.max_windows is not None and args.max_windows < 1:
        raise AsftError(f"--max-windows must be at least 1, got {args.max_windows}")
    resolve_model(args.model)
    resolve_data_dir(args.data_dir)
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


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        {"prune": _prune, "submit": _submit, "eval": _eval}[args.command](args)
    except AsftError as err:
        print(f"asft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
