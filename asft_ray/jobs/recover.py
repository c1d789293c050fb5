"""Ray job entrypoint: recovery fine-tuning from a YAML config.

    ray job submit --address http://127.0.0.1:8265 -- python -m asft_ray.jobs.recover CONFIG.yaml [flags]

Inside a Ray job the driver joins the job's cluster (Ray sets RAY_ADDRESS). Extra
arguments are `asft recover` flags (e.g. --resume, --workers 4).
"""

import sys

from asft_ray.cli import main


def run(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m asft_ray.jobs.recover CONFIG.yaml [asft recover flags]", file=sys.stderr)
        return 2
    return main(["recover", "--config", argv[0], *argv[1:]])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
