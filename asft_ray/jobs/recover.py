"""Ray job entrypoint: `asft recover` from a YAML config.

    ray job submit --address http://127.0.0.1:8265 -- python -m asft_ray.jobs.recover CONFIG.yaml [asft recover flags]
"""

import sys

from asft_ray.jobs import run_command


def run(argv: list[str]) -> int:
    return run_command("recover", argv, config_flag=True, quiet=False)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
