"""`asft submit`: send a run config to a Ray cluster as a Ray job (a thin JobSubmissionClient wrapper).

The job's working_dir is a small folder made for it: the `asft_ray` package, the `jobs/`
entrypoints and the config. Paths inside the config are paths on the cluster: relative
`out`, `data_dir` and local `model` paths are made absolute here, which suits a local head
or a cluster with shared storage.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import yaml

from asft_ray.config import PruneConfig, load_yaml
from asft_ray.data import resolve_data_dir
from asft_ray.errors import AsftError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _absolute_config_paths(values: dict) -> dict:
    values = dict(values)
    if values.get("method") != "magnitude":  # the default data dir is found here, where ../shared is
        values["data_dir"] = resolve_data_dir(values.get("data_dir"))
    for key in ("out", "data_dir", "model"):
        value = values.get(key)
        if isinstance(value, str) and value != "hub" and (key != "model" or Path(value).exists()):
            values[key] = str(Path(value).expanduser().resolve())
    return values


def _job_folder(values: dict) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="asft-job-"))
    shutil.copytree(PACKAGE_ROOT / "asft_ray", folder / "asft_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PACKAGE_ROOT / "jobs", folder / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=True))
    return folder


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # ConnectionError, auth errors, bad URLs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AsftError(f"could not reach the Ray job server at {address}: {first}") from err


def _submit_with_retry(client, folder: Path, agent_wait_s: float = 90) -> str:
    """Submit; a head that has just started may not have its job agent yet, so retry that case."""
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(
                entrypoint="python jobs/prune.py config.yaml",
                runtime_env={"working_dir": str(folder), "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
            )
        except RuntimeError as err:
            if "No available agent" in str(err) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            first = str(err).strip().splitlines()[0]
            raise AsftError(f"the job server refused the job: {first}") from err


def submit(config_path: str, address: str, wait: bool = True, timeout_s: float = 3600, log=print) -> dict:
    """Validate the config here, submit `python jobs/prune.py config.yaml`, optionally wait.

    Returns {"job_id", "status"}; raises AsftError when the job fails or times out."""
    values = _absolute_config_paths(load_yaml(config_path))
    PruneConfig.from_dict(values, source=config_path)  # fail here, not on the cluster
    client = _client(address)
    folder = _job_folder(values)
    try:
        job_id = _submit_with_retry(client, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    log(f"submitted job {job_id} to {address}")
    if not wait:
        return {"job_id": job_id, "status": "PENDING"}
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL:
        if time.monotonic() > deadline:
            raise AsftError(f"job {job_id} still {status} after {timeout_s:g}s (it keeps running; `ray job stop {job_id}`)")
        time.sleep(1)
        status = str(client.get_job_status(job_id).value)
    if status != "SUCCEEDED":
        tail = client.get_job_logs(job_id).strip().splitlines()[-1:] or ["(no logs)"]
        raise AsftError(f"job {job_id} {status}: {tail[0]}")
    return {"job_id": job_id, "status": status}
