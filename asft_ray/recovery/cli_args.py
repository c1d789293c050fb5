"""`asft recover`: its flags and its handler (asft_ray.cli wires them in)."""

from __future__ import annotations

import json


def add_recover_parser(sub, add_common) -> None:
    from asft_ray.config import add_config_flags
    from asft_ray.recovery.config import RecoverConfig
    from asft_ray.recovery.deepspeed_config import DEFAULTS

    r = sub.add_parser("recover", help="fine-tune a pruned model's surviving weights (DeepSpeed ZeRO on Ray Train)")
    r.add_argument("--config", help="YAML file with any of the settings below (flags override it)")
    add_config_flags(r, RecoverConfig, skip=("data_dir", "device"), defaults=DEFAULTS)  # those two: add_common
    add_common(r)
    r.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or an embedded one)")
    r.add_argument("--json", action="store_true", help="print the run record as JSON")


def recover_from_args(args) -> None:
    from asft_ray.config import config_from_args
    from asft_ray.recovery.config import RecoverConfig
    from asft_ray.recovery.recipe import run_recover

    cfg = config_from_args(args, RecoverConfig)
    record = run_recover(cfg, address=args.address)
    if args.json:
        print(json.dumps(record, indent=2, sort_keys=True))
    elif record.get("stopped"):
        print(f"stopped after step {record['steps_done']}; continue with --resume")
    else:
        losses = record["losses"]
        print(f"recovered {cfg.model}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps, "
              f"{record['tokens_per_s']:.0f} tokens/s -> {cfg.out}")
