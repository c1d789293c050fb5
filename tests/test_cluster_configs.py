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
