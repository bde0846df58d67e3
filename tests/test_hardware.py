import json

import pytest

from planner.hardware import HardwareProfile, list_profiles, load_cluster, load_profile
from planner.plan import Layout
from planner.topology import axis_groups, axis_link, mesh_ring_bandwidth, pipeline_p2p_link

EXPECTED = {"a100-40g", "a100-80g", "h100-80g", "h200", "v100-16g", "v100-32g", "cpu"}


def test_every_profile_loads_and_cites_its_numbers():
    assert EXPECTED <= set(list_profiles())
    for name in list_profiles():
        profile = load_profile(name)
        assert profile.gpus_per_node >= 1 and profile.gpu.memory_bytes > 0
        assert profile.sources, f"{name} has no sources"
        for part in ("intra_node", "inter_node"):
            assert part in profile.sources, f"{name}: no source for {part}"
        assert HardwareProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_v100_has_no_bf16():
    assert not load_profile("v100-16g").supports("bf16")
    assert load_profile("a100-80g").supports("bf16")


def test_cube_mesh_ring_is_slower_than_nvswitch():
    v100, a100 = load_profile("v100-32g"), load_profile("a100-80g")
    ring8 = axis_link(v100, Layout(dp=8), "dp")
    switch8 = axis_link(a100, Layout(dp=8), "dp")
    assert ring8.bandwidth_bytes_per_s < switch8.bandwidth_bytes_per_s
    # DGX-1V: 3 edge-disjoint Hamiltonian cycles over 6 NVLinks per GPU -> 6 rings x 25 GB/s
    assert mesh_ring_bandwidth(v100.intra_node, tuple(range(8))) == 150e9
    # GPUs 0 and 5 share no NVLink: traffic goes over PCIe/QPI
    assert mesh_ring_bandwidth(v100.intra_node, (0, 5)) == 10e9
    assert mesh_ring_bandwidth(v100.intra_node, (0, 3)) == 50e9  # two bonded links


def test_groups_follow_mesh_order():
    sizes = {"pp": 2, "dp": 2, "tp": 2}
    tp = axis_groups(("pp", "dp", "tp"), sizes, "tp")
    assert tp.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    dp = axis_groups(("pp", "dp", "tp"), sizes, "dp")
    assert dp.tolist() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    tp_outer = axis_groups(("tp", "pp", "dp"), sizes, "tp")
    assert tp_outer.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_link_tiers_across_nodes():
    a100 = load_profile("a100-80g")
    layout = Layout(dp=4, tp=8)  # 4 nodes: TP inside a node, DP across nodes
    assert axis_link(a100, layout, "tp").tier == "intra"
    dp = axis_link(a100, layout, "dp")
    assert dp.tier == "inter" and dp.num_nodes == 4 and dp.ranks_per_node == 1
    # 8 DP groups share the node's 8 HDR NICs: 1/8 of 200 GB/s x 0.9 efficiency each
    assert dp.bandwidth_bytes_per_s == pytest.approx(200e9 * 0.9 / 8)
    pp = pipeline_p2p_link(a100, Layout(pp=4, tp=8))
    assert pp.tier == "inter"


def test_cluster_is_profile_times_nodes():
    cluster = load_cluster("h100-80g", 4)
    assert cluster.world_size == 32
    assert load_cluster("h100-80g", 4, num_gpus=20).world_size == 20
    with pytest.raises(ValueError, match="num_gpus 40 exceeds 4 node"):
        load_cluster("h100-80g", 4, num_gpus=40)


def test_unknown_profile_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown cluster profile 'tpu-v9'"):
        load_profile("tpu-v9")
