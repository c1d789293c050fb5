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


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
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
