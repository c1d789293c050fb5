"""The cluster recipes parse and keep the settings the docs promise (localhost dashboards, no usage stats)."""

import subprocess

import yaml

from tests.conftest import REPO

CLUSTER = REPO / "cluster"


def test_kuberay_manifest_is_a_raycluster_with_a_cpu_only_head():
    doc = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-scorers", "gpu-scorers"}
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in container["env"]
    gpu = groups["gpu-scorers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"


def test_cluster_launcher_config_has_the_required_sections():
    doc = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands"):
        assert key in doc, key
    assert doc["head_node_type"] in doc["available_node_types"]
    assert doc["available_node_types"][doc["head_node_type"]]["resources"] == {"CPU": 0}
    assert all(
        t["min_workers"] <= t["max_workers"] <= doc["max_workers"]
        for name, t in doc["available_node_types"].items()
        if name != doc["head_node_type"]
    )
    assert any("--dashboard-host=127.0.0.1" in c for c in doc["head_start_ray_commands"])


def test_local_head_script_binds_to_localhost():
    text = (CLUSTER / "local-head.sh").read_text()
    assert "--node-ip-address=127.0.0.1" in text and "--dashboard-host=127.0.0.1" in text
    assert subprocess.run(["bash", "-n", str(CLUSTER / "local-head.sh")]).returncode == 0


# ---- the cluster image and the RayJob (issue 17 item 13): one Ray version everywhere ----

def _pyproject():
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirement(name):
    from packaging.requirements import Requirement

    found = [Requirement(r) for r in _pyproject()["dependencies"] if Requirement(r).name == name]
    assert len(found) == 1, name
    return found[0]


def _dockerfile():
    """(ARG defaults, the FROM image with them substituted, the RUN text) of the Dockerfile."""
    import re

    lines, text = [], (REPO / "Dockerfile").read_text()
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append(line.strip())
    args = {}
    for line in lines:
        match = re.fullmatch(r"ARG (\w+)(?:=(\S+))?", line)
        if match and match.group(2) is not None:
            args[match.group(1)] = match.group(2)
    froms = [line.split(None, 1)[1] for line in lines if line.startswith("FROM ")]
    assert len(froms) == 1, froms
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[0])
    assert all(line.split()[0] in {"ARG", "FROM", "ENV", "WORKDIR", "COPY", "RUN"} for line in lines), lines
    return args, image, " ".join(line for line in lines if line.startswith("RUN "))


def _images(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return spec, [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]


def test_the_cluster_image_is_the_ray_image_this_checkout_is_tested_with():
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    args, image, run = _dockerfile()
    ray_version = args["RAY_VERSION"]
    assert image == f"rayproject/ray:{ray_version}-py311"
    assert ray_version in _requirement("ray").specifier and ray_version == version("ray")  # client == cluster
    assert "3.11" in SpecifierSet(_pyproject()["requires-python"])
    torch_pin = args["TORCH"].removeprefix("torch==")
    assert torch_pin in _requirement("torch").specifier
    import re

    assert re.search(rf"^TORCH\s+\?=\s+torch=={re.escape(torch_pin)}$", (REPO / "Makefile").read_text(), re.M)  # `make install`'s
    assert 'pip install --no-cache-dir . "ray[default,tune,train]==${RAY_VERSION}"' in run  # Ray held at the base's
    assert "COPY --chown=ray:users asft_ray ./asft_ray" in (REPO / "Dockerfile").read_text()


def test_the_rayjob_runs_a_job_entrypoint_on_the_asft_image():
    import importlib

    doc = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    command = spec["entrypoint"].split()
    assert command[:2] == ["python", "-m"] and command[2].startswith("asft_ray.jobs.") and len(command) == 4
    assert callable(importlib.import_module(command[2]).run)
    assert command[3].startswith("/mnt/asft/")  # a path in the pods, on the shared volume
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["ASFT_DATA_DIR"].startswith("/mnt/asft/")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster, _ = _images(doc)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_every_manifest_names_the_image_of_this_version():
    args, _, _ = _dockerfile()
    version, ray_version = _pyproject()["version"], args["RAY_VERSION"]
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        spec, images = _images(yaml.safe_load((CLUSTER / name).read_text()))
        assert spec["rayVersion"] == ray_version, name
        assert images and all(i.split("-gpu")[0] == f"asft-ray:{version}-ray{ray_version}-py311" for i in images), images
    assert f'"ray[default,tune,train]=={ray_version}"' in (CLUSTER / "aws-cluster.yaml").read_text()
