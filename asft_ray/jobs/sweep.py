"""Ray job entrypoint: `asft sweep` from a YAML config.

    ray job submit --address http://127.0.0.1:8265 -- python -m asft_ray.jobs.sweep CONFIG.yaml [asft sweep flags]
"""

import sys

from asft_ray.jobs import run_command


def run(argv: list[str]) -> int:
    return run_command("sweep", argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
