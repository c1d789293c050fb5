"""Ray job entrypoint: one-shot pruning from a YAML config.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/prune.py configs/demo.yaml

Inside a Ray job the driver joins the job's cluster (RAY_ADDRESS is set by Ray).
Extra arguments are passed on as `asft prune` flags (e.g. --overwrite).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working_dir holds the package

from asft_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python jobs/prune.py CONFIG.yaml [asft prune flags]")
    sys.exit(main(["prune", "--config", sys.argv[1], "--no-progress", *sys.argv[2:]]))
