"""Placement feasibility: pure arithmetic over the nodes' resource totals."""

from asft_ray.distributed.placement import fit_on_node, never_fits

GiB = 2**30


def test_identical_actors_fill_each_node_by_its_scarcest_resource():
    node = {"CPU": 8, "GPU": 2, "memory": 30 * GiB}
    assert fit_on_node(node, {"CPU": 1, "GPU": 0, "memory": 0}) == 8
    assert fit_on_node(node, {"CPU": 1, "GPU": 1}) == 2
    assert fit_on_node(node, {"CPU": 1, "memory": 16 * GiB}) == 1
    assert fit_on_node(node, {"CPU": 0.5}) == 16
    assert fit_on_node({"CPU": 1}, {"CPU": 1 / 3}) == 3  # float shares are not lost to rounding


def test_actors_spread_over_nodes_but_never_split_across_them():
    two_small = [{"CPU": 1}, {"CPU": 1}]
    assert never_fits(two_small, {"CPU": 1}, 2) is None
    assert never_fits(two_small, {"CPU": 2}, 1) == "2 CPU each (the largest node has 1, the cluster 2)"
    assert never_fits(two_small, {"CPU": 1}, 3) == "1 CPU each (the largest node has 1, the cluster 2)"


def test_only_the_short_resources_are_named_and_nothing_asked_always_fits():
    nodes = [{"CPU": 16, "GPU": 1}, {"CPU": 2}]
    assert never_fits(nodes, {"CPU": 1, "GPU": 1}, 2) == "1 GPU each (the largest node has 1, the cluster 1)"
    assert never_fits(nodes, {"CPU": 0, "GPU": 0, "memory": 0}, 5) is None
    # each resource exists somewhere, never together on one node
    assert never_fits(nodes, {"CPU": 4, "GPU": 1}, 2) is not None
    assert never_fits([], {"CPU": 1}) == "1 CPU each (the largest node has 0, the cluster 0)"


def test_require_placeable_names_what_and_the_short_resource():
    import pytest

    from asft_ray.distributed.placement import require_placeable, resource_ask
    from asft_ray.errors import AsftError

    assert resource_ask(2) == {"CPU": 2, "GPU": 0, "memory": 0}
    require_placeable("a trial", resource_ask(1), 2, nodes=[{"CPU": 1}, {"CPU": 1}])  # fits: no error
    with pytest.raises(AsftError, match=r"^3 workers can never be placed: they ask 1 CPU each \(the largest"):
        require_placeable("3 workers", resource_ask(1), 3, nodes=[{"CPU": 1}, {"CPU": 1}])
    with pytest.raises(AsftError, match=r"^the coordinator can never be placed: it asks 1 GPU each"):
        require_placeable("the coordinator", resource_ask(1, 1), nodes=[{"CPU": 4}])
