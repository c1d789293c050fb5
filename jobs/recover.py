"""Ray job entrypoint: recovery fine-tuning from a YAML config (for a working_dir upload).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/recover.py configs/recover-demo.yaml

Same as `python -m asft_ray.jobs.recover`, for clusters where asft-ray is not installed:
the uploaded working dir carries the package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working_dir holds the package

from asft_ray.jobs.recover import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
