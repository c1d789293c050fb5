"""Sharded scoring across two simulated nodes gives the same weights as one worker on one node."""

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from asft_ray.distributed.sharded import WorkerResources, start_workers
from tests.test_sharded import pruned_weights


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


# wanda (15 s) in `make test-slow`: sparsegpt covers the same placement and adds the Hessian reduction across nodes
@pytest.mark.parametrize("method", [pytest.param("wanda", marks=pytest.mark.slow), "sparsegpt"])
def test_two_nodes_match_one_worker(two_nodes, tiny_model, method):
    calib8 = torch.randint(0, 512, (8, 48), generator=torch.Generator().manual_seed(1))
    one = start_workers(1, WorkerResources(cpus=1))
    try:
        w1 = pruned_weights(tiny_model, method, calib8, one)
    finally:
        ray.kill(one[0])
    two = start_workers(2, WorkerResources(cpus=1))
    try:
        assert len({ray.get(w.node.remote()) for w in two}) == 2  # 1 CPU per node and per actor: one each
        w2 = pruned_weights(tiny_model, method, calib8, two)
    finally:
        for w in two:
            ray.kill(w)
    for key in w1:
        assert torch.equal(w1[key], w2[key]), key


def _cfg(**overrides):
    from asft_ray.config import PruneConfig

    values = dict(model="m", method="wanda", sparsity=0.5, out="/tmp/never-written")
    values.update(overrides)
    return PruneConfig(**values)


def test_the_coordinator_reserves_what_one_node_has_never_zero_cpus():
    from asft_ray.distributed.runner import coordinator_options

    nodes = [{"CPU": 0, "memory": 8e9}, {"CPU": 16, "GPU": 2}, {"CPU": 16, "GPU": 2}]  # a KubeRay-like 0-CPU head
    assert coordinator_options(_cfg(), nodes) == {"num_cpus": 16, "num_gpus": 1}  # auto on a GPU cluster, no workers
    assert coordinator_options(_cfg(device="cpu"), nodes) == {"num_cpus": 16, "num_gpus": 0}  # one node's, not 32
    with_workers = coordinator_options(_cfg(workers=4, device="auto", coordinator_memory_gb=2), nodes)
    assert with_workers == {"num_cpus": 1, "num_gpus": 0, "memory": 2 * 2**30}  # 1 CPU: never placed on the head
    assert coordinator_options(_cfg(workers=2, device="cuda"), nodes)["num_gpus"] == 1
    # asft's own one-node cluster: an orchestrating coordinator leaves every core to the workers
    assert coordinator_options(_cfg(workers=2, device="cpu"), [{"CPU": 2}], embedded=True)["num_cpus"] == 0


def test_an_impossible_coordinator_fails_at_once_naming_the_resource(two_nodes):
    import time

    from asft_ray.distributed.runner import place_coordinator
    from asft_ray.errors import AsftError

    start = time.monotonic()
    with pytest.raises(AsftError, match=r"can never be placed: it asks 2 CPU each \(the largest node has 1, "
                                         r"the cluster 2\)"):
        place_coordinator(_cfg(coordinator_cpus=2), timeout_s=600)  # the cluster has 2 CPUs, but no node has
    assert time.monotonic() - start < 5  # at once, not after the timeout
    worker = place_coordinator(_cfg(), timeout_s=30)  # default: every CPU of the largest node (1) fits
    ray.kill(worker)
