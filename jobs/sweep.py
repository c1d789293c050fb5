"""Ray job entrypoint for a working_dir upload: `asft sweep` from a YAML config.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/sweep.py CONFIG.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working_dir holds the package

from asft_ray.jobs.sweep import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
