"""Ray job entrypoints inside the package: `ray job submit ... -- python -m asft_ray.jobs.NAME CONFIG [flags]`.

Each module is one line over `run_command`: the matching `asft` subcommand on a YAML config.
Inside a Ray job the driver joins the job's cluster (Ray sets RAY_ADDRESS).

Why two layers of entrypoints: these modules serve clusters whose image has asft-ray installed
(the Dockerfile, KubeRay's RayJob); the top-level `jobs/NAME.py` scripts serve a `--working-dir .`
upload to a cluster without it, and only put the uploaded folder on sys.path and call these.
"""

import sys


def run_command(command: str, argv: list[str], config_flag: bool = False, quiet: bool = True) -> int:
    """`asft COMMAND [--config] CONFIG [--no-progress] FLAGS...`; usage and exit 2 without a config."""
    from asft_ray.cli import main

    if not argv:
        print(f"usage: python -m asft_ray.jobs.{command} CONFIG.yaml [asft {command} flags]", file=sys.stderr)
        return 2
    config = ["--config", argv[0]] if config_flag else [argv[0]]
    return main([command, *config, *(["--no-progress"] if quiet else []), *argv[1:]])
