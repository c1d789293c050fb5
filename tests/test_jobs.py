"""Ray jobs on a real local head started by the test (and only that head is stopped)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.test_cli import asft, assert_one_line_error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    gcs, dashboard = free_port(), free_port()
    # the head (and so every job's `python`) runs from this virtualenv, as it would on a real cluster node
    venv_bin = os.path.dirname(sys.executable)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--disable-usage-stats",
         # every other port free too, so the test never collides with another Ray on this host
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}",
         f"--temp-dir={tmp_path_factory.mktemp('ray')}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or head.poll() is not None:
                head.kill()
                pytest.fail("the local Ray head did not come up")
            time.sleep(1)
    yield address
    # `ray start --block` stops what it started when it alone gets SIGTERM (about 3 s here); a SIGTERM
    # to its whole process group took 33-62 s, each Ray process shutting down while the others went
    os.kill(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    finally:
        try:  # what is left of the head's session (its own, start_new_session) goes too
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_asft_submit_runs_a_prune_job_to_success(ray_head, tiny_model_dir, tmp_path):
    out = tmp_path / "from-job"
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {tiny_model_dir}\nmethod: wanda\nsparsity: 0.5\nnsamples: 2\nseqlen: 32\nout: {out}\n")
    proc = asft("submit", str(config), "--address", ray_head, "--timeout", "300", env={"RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "SUCCEEDED" in proc.stdout
    run = json.loads((out / "asft_run.json").read_text())
    assert run["sparsity"]["total"] == pytest.approx(0.5, abs=1e-4)


def test_submit_rejects_a_bad_config_before_submitting(ray_head, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model: smollm2-135m\nmethod: wanda\nsparsity: 0.5\nout: x\nlearning_rate: 1\n")
    assert_one_line_error(asft("submit", str(config), "--address", ray_head), "unknown key(s) learning_rate")


def test_submit_to_an_unreachable_address_is_one_line(tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text("model: smollm2-135m\nmethod: magnitude\nsparsity: 0.5\nout: x\n")
    proc = asft("submit", str(config), "--address", f"http://127.0.0.1:{free_port()}", timeout=120)
    assert_one_line_error(proc, "could not reach the Ray job server")


@pytest.mark.slow  # 20 s: `make test-slow`. The default suite submits the same job through `asft submit` (above)
def test_plain_ray_job_submit_with_the_module_entrypoint(ray_head, tiny_model_dir, tmp_path, data_dir):
    out = tmp_path / "plain-job"
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {tiny_model_dir}\nmethod: magnitude\nsparsity: 0.3\nout: {out}\n")
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [ray_bin, "job", "submit", "--address", ray_head, "--", "python", "-m", "asft_ray.jobs.prune", str(config)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    assert json.loads((out / "asft_run.json").read_text())["sparsity"]["total"] == pytest.approx(0.3, abs=1e-3)
