"""Ray job entrypoint: `asft sweep` from a YAML config.

    ray job submit --address http://127.0.0.1:8265 -- python -m asft_ray.jobs.sweep CONFIG.yaml [flags]

Inside a Ray job the driver joins the job's cluster (Ray sets RAY_ADDRESS). Extra
arguments are `asft sweep` flags (e.g. --out DIR).
"""

import sys

from asft_ray.cli import main


def run(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m asft_ray.jobs.sweep CONFIG.yaml [asft sweep flags]", file=sys.stderr)
        return 2
    return main(["sweep", argv[0], "--no-progress", *argv[1:]])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
