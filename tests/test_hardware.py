import json
from pathlib import Path

import pytest

from planner.cost.memory import rank_memory
from planner.hardware import (
    OUTSIDE_TENSOR_KEYS,
    Cluster,
    HardwareProfile,
    HostSpec,
    list_profiles,
    load_cluster,
    load_profile,
)
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import load_model
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
        for key in OUTSIDE_TENSOR_KEYS:  # each item outside tensors cites where it comes from
            assert len(profile.sources.get(f"gpu.{key}", "")) > 20, f"{name}: no source for {key}"
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


def _profile(**changes) -> dict:
    """The a100-80g profile as a dict, with dotted keys replaced ("gpu.memory_bytes": 1)."""
    data = json.loads(json.dumps(load_profile("a100-80g").to_dict()))
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        part = data
        for p in parents:
            part = part[p]
        part[key] = value
    return data


@pytest.mark.parametrize("key, value, message", [
    ("inter_node.bandwidth_bytes_per_s", 0, r"inter_node.bandwidth_bytes_per_s must be in"),
    ("intra_node.bandwidth_bytes_per_s", 0.0, "intra_node.bandwidth_bytes_per_s must be in"),
    ("gpu.hbm_bandwidth_bytes_per_s", 1e30, "gpu.hbm_bandwidth_bytes_per_s must be in"),
    ("intra_node.efficiency", 1.5, r"intra_node.efficiency must be in \(0.0, 1.0\], got 1.5"),
    ("inter_node.efficiency", 0, r"inter_node.efficiency must be in \(0.0, 1.0\], got 0"),
    ("gpu.gemm_efficiency_max", 2, "gpu.gemm_efficiency_max must be in"),
    ("gpu.memory_bytes", 1, r"gpu.memory_bytes must be in \[1048576, 17592186044416\], got 1"),
    ("gpu.memory_bytes", 10**30, "gpu.memory_bytes must be in"),
    ("gpu.memory_bytes", 8e10, "gpu.memory_bytes must be an integer"),
    ("inter_node.latency_s", 1e300, r"inter_node.latency_s must be in \[0, 10.0\]"),
    ("gpu.kernel_overhead_s", -1e-6, "gpu.kernel_overhead_s must be in"),
    ("gpu.peak_flops.bf16", 1e30, "gpu.peak_flops.bf16 must be in"),
    ("gpus_per_node", 2**31, r"gpus_per_node must be in \[1, 1024\]"),
    ("gpu.context_bytes", -1, "gpu.context_bytes must be in"),
    ("gpu.comm_buffer_bytes_per_group", 1.5, "gpu.comm_buffer_bytes_per_group must be"),
    ("gpu.allocator_fragmentation", 1.5, "gpu.allocator_fragmentation must be in"),
    ("name", "a\nb", "printable"),
    ("description", 3, "description must be a string"),
    ("sources", {"gpu": 1}, "sources must be an object"),
    ("gpu", [], "hardware profile gpu: expected a JSON object"),
])
def test_physically_impossible_profiles_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message) as err:
        HardwareProfile.from_dict(_profile(**{key: value}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("links, message", [
    ([[0, 1, "2"]], "is not \\[gpu_a, gpu_b, num_links\\]"),
    ([[0, 0, 1]], "gpu_a != gpu_b"),
    ([[0, 1, 100]], "1 <= num_links <= 18"),
    ([[0, 1, True]], "is not"),
    ([[0, 1, 10], [0, 2, 10]], "give GPU 0 20 links"),
    ([[0, 9, 1]], "names a GPU beyond gpus_per_node 8"),
    ("0-1", "must list"),
])
def test_nvlink_mesh_links_are_checked(links, message):
    data = json.loads(json.dumps(load_profile("v100-16g").to_dict()))
    data["intra_node"]["links"] = links
    with pytest.raises(ValueError, match=message):
        HardwareProfile.from_dict(data)


def test_nvlink_mesh_nodes_are_small_enough_to_search():
    data = json.loads(json.dumps(load_profile("v100-16g").to_dict()))
    data["gpus_per_node"] = 16
    with pytest.raises(ValueError, match=r"gpus_per_node of an nvlink_mesh profile must be in"):
        HardwareProfile.from_dict(data)


def test_every_profile_key_is_required_in_schema_4():
    data = _profile()
    assert data["schema_version"] == 4
    for part in ("gpu", "intra_node", "inter_node", "host"):
        for key in list(data[part]):
            if part == "intra_node" and key in ("links", "link_bandwidth_bytes_per_s",
                                                "fallback_bandwidth_bytes_per_s"):
                continue  # documented: only an nvlink_mesh fabric needs them
            broken = _profile()
            del broken[part][key]
            with pytest.raises(ValueError, match=f"{part}: missing key '{key}'"):
                HardwareProfile.from_dict(broken)
    for key in list(data):
        broken = {k: v for k, v in data.items() if k != key}
        with pytest.raises(ValueError, match=f"missing key '{key}'"):
            HardwareProfile.from_dict(broken)
    mesh = json.loads(json.dumps(load_profile("v100-16g").to_dict()))
    del mesh["intra_node"]["links"]
    with pytest.raises(ValueError, match="intra_node: missing key 'links'"):
        HardwareProfile.from_dict(mesh)


SCHEMA_2_FILE = Path(__file__).parent / "fixtures" / "profile_h100_schema2.json"


def _as_old(profile, version: int) -> dict:
    """A current profile written as a schema 1/2 file: one framework_overhead_bytes."""
    old = json.loads(json.dumps(profile.to_dict()))
    old["schema_version"] = version
    del old["host"]
    gpu = old["gpu"]
    gpu["framework_overhead_bytes"] = gpu["context_bytes"]
    for key in OUTSIDE_TENSOR_KEYS:
        del gpu[key]
    return old


def test_schema_3_profiles_load_without_host_figures():
    """A schema 3 file has no host section: it loads with every host figure 0 (not known)."""
    old = json.loads(json.dumps(load_profile("h100-80g").to_dict()))
    old["schema_version"] = 3
    del old["host"]
    loaded = HardwareProfile.from_dict(old)
    assert loaded.schema_version == 4 and loaded.host == HostSpec() and not loaded.host.known
    assert loaded.gpu == load_profile("h100-80g").gpu
    assert load_profile("h100-80g").host.known
    with pytest.raises(ValueError, match="host.h2d_bandwidth_bytes_per_s must be in"):
        HostSpec(h2d_bandwidth_bytes_per_s=-1.0)


def test_schema_1_profiles_still_load_as_schema_4():
    current = load_profile("cpu")
    old = _as_old(current, 1)
    loaded = HardwareProfile.from_dict(old)  # v1 files may carry the v2 gpu keys too
    assert loaded.gpu == current.gpu and loaded.schema_version == 4
    for key in ("host_layer_overhead_s", "host_is_device", "shared_cores"):
        del old["gpu"][key]
    loaded = HardwareProfile.from_dict(old)
    assert loaded.schema_version == 4 and loaded.gpu.host_layer_overhead_s == {}
    assert not loaded.gpu.host_is_device and loaded.gpu.shared_cores == 0
    with pytest.raises(ValueError, match="schema_version 5 is not supported"):
        HardwareProfile.from_dict({**current.to_dict(), "schema_version": 5})


def test_a_schema_2_file_keeps_its_framework_overhead_whole_as_the_context():
    """The shipped h100-80g.json as it was in schema 2: its 2 GiB outside tensors load as
    context_bytes, the other items 0, so every total it gave is unchanged; its sources say so."""
    old = json.loads(SCHEMA_2_FILE.read_text())
    assert old["schema_version"] == 2 and old["gpu"]["framework_overhead_bytes"] == 2**31
    loaded = load_profile(str(SCHEMA_2_FILE))
    gpu = loaded.gpu
    assert loaded.schema_version == 4 and gpu.context_bytes == 2**31
    assert (gpu.blas_workspace_bytes, gpu.comm_buffer_bytes_per_group,
            gpu.comm_buffer_bytes_per_peer, gpu.allocator_fragmentation) == (0, 0, 0, 0.0)
    assert "not itemised" in loaded.sources["gpu.context_bytes"]
    assert "gpu.framework_overhead_bytes" not in loaded.sources
    plan = Plan(model=load_model("llama3-8b"), cluster=Cluster(profile=loaded, num_nodes=1),
                job=Job(global_batch=64, seq_len=2048, precision="bf16"),
                layout=Layout(dp=2, tp=4, micro_batch=1, num_microbatches=32))
    mem = rank_memory(plan, 0)
    assert mem.framework_bytes == 2**31 and mem.total_bytes == mem.tensor_bytes + 2**31


def test_old_and_new_outside_tensor_keys_are_never_mixed():
    mixed = json.loads(SCHEMA_2_FILE.read_text())
    mixed["gpu"]["context_bytes"] = 1
    with pytest.raises(ValueError, match="'context_bytes' is a schema 3 key"):
        HardwareProfile.from_dict(mixed)
    lacking = json.loads(SCHEMA_2_FILE.read_text())
    del lacking["gpu"]["framework_overhead_bytes"]
    with pytest.raises(ValueError, match="missing key 'framework_overhead_bytes'"):
        HardwareProfile.from_dict(lacking)
    new = _profile()
    new["gpu"]["framework_overhead_bytes"] = 2**31
    with pytest.raises(ValueError, match="unknown key 'framework_overhead_bytes'"):
        HardwareProfile.from_dict(new)


def test_a_dense_nvlink_mesh_is_searched_quickly():
    import dataclasses
    import time
    intra = load_profile("v100-16g").intra_node
    dense = dataclasses.replace(intra, links=[[a, b, 2] for a in range(8)
                                              for b in range(a + 1, 8)])
    start = time.process_time()
    assert mesh_ring_bandwidth(dense, tuple(range(8))) > 0
    assert time.process_time() - start < 5  # was an exhaustive search of 2,520 cycles
