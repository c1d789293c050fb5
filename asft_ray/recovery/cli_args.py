"""`asft recover`: its flags and its handler (asft_ray.cli wires them in)."""

from __future__ import annotations

import dataclasses
import json


def add_recover_parser(sub, add_common) -> None:
    r = sub.add_parser("recover", help="fine-tune a pruned model's surviving weights (DeepSpeed ZeRO on Ray Train)")
    r.add_argument("--config", help="YAML file with any of the settings below (flags override it)")
    r.add_argument("--model", help="the pruned model: its zeros are kept (HF dir, alias, .gguf, hub id)")
    r.add_argument("--teacher", help="dense model to distill from (same vocabulary)")
    r.add_argument("--data", help="training text: c4 (default)")
    r.add_argument("--mask-file", help="safetensors of bool masks by parameter name, instead of the model's zeros")
    r.add_argument("--dense", action="store_true", default=None,
                   help="no masks: train every decoder weight (for a structured export, smaller rather than sparse)")
    r.add_argument("--workers", type=int, help="Ray Train workers (default 2)")
    r.add_argument("--worker-cpus", type=float, help="CPUs per worker (default 1)")
    r.add_argument("--zero-stage", type=int, choices=[2, 3], help="DeepSpeed ZeRO stage (default 2)")
    r.add_argument("--max-steps", type=int, help="optimizer steps (default 100)")
    r.add_argument("--seqlen", type=int, help="training window length (default 512)")
    r.add_argument("--micro-batch", type=int, help="windows per worker per micro-step (default 1)")
    r.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 1)")
    r.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 5e-5)")
    r.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay (default 0)")
    r.add_argument("--warmup-steps", type=int, help="linear warm-up steps, then cosine (default max_steps // 10)")
    r.add_argument("--min-lr-ratio", type=float, help="cosine ends at lr * this (default 0.1)")
    r.add_argument("--clip", type=float, help="gradient norm clipping (default 1.0)")
    r.add_argument("--bf16", action="store_true", default=None, help="bf16 weights and activations, fp32 master")
    r.add_argument("--offload-optimizer", action="store_true", default=None, help="optimizer state on the CPU")
    r.add_argument("--offload-params", action="store_true", default=None, help="parameters on the CPU (ZeRO-3)")
    r.add_argument("--deepspeed", help="DeepSpeed JSON/YAML merged with these flags (a conflicting key is an error)")
    r.add_argument("--lm-weight", type=float, help="weight of the next-token loss (default 1)")
    r.add_argument("--kd-weight", type=float, help="weight of the logit KL to the teacher (default 1 with --teacher)")
    r.add_argument("--temperature", type=float, help="distillation temperature (default 2)")
    r.add_argument("--hidden-weight", type=float, help="weight of the hidden-state MSE to the teacher (default 0)")
    r.add_argument("--train-norms", action="store_true", default=None, help="also train norm weights")
    r.add_argument("--train-biases", action="store_true", default=None, help="also train linear biases")
    r.add_argument("--seed", type=int, help="data order seed (default 0)")
    r.add_argument("--checkpoint-every", type=int, help="steps between DeepSpeed checkpoints (default 0: none)")
    r.add_argument("--eval-every", type=int, help="steps between WikiText-2 valid ppl checks (default 0: none)")
    r.add_argument("--eval-windows", type=int, help="windows per ppl check (default 4)")
    r.add_argument("--eval-seqlen", type=int, help="ppl window length (default: --seqlen)")
    r.add_argument("--out", help="output model directory")
    r.add_argument("--overwrite", action="store_true", default=None, help="replace an --out that holds a different run")
    r.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint")
    add_common(r)
    r.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or an embedded one)")
    r.add_argument("--json", action="store_true", help="print the run record as JSON")


def recover_from_args(args) -> None:
    from asft_ray.config import load_yaml
    from asft_ray.recovery.config import RecoverConfig
    from asft_ray.recovery.recipe import run_recover

    values = load_yaml(args.config) if args.config else {}
    for field in dataclasses.fields(RecoverConfig):
        if field.name != "device" and getattr(args, field.name, None) is not None:
            values[field.name] = getattr(args, field.name)
    if args.device != "auto" or "device" not in values:
        values["device"] = args.device
    cfg = RecoverConfig.from_dict(values, source=args.config or "flags")
    record = run_recover(cfg, address=args.address)
    if args.json:
        print(json.dumps(record, indent=2, sort_keys=True))
    elif record.get("stopped"):
        print(f"stopped after step {record['steps_done']}; continue with --resume")
    else:
        losses = record["losses"]
        print(f"recovered {cfg.model}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps, "
              f"{record['tokens_per_s']:.0f} tokens/s -> {cfg.out}")
