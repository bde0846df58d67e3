"""When nothing fits, say what would - each line from a real re-run of the search or the
estimate with one setting relaxed (more nodes, full recompute, smaller micro-batch, CPU offload,
less headroom, a GPU with more memory), never from a guess."""

import dataclasses

from planner import rules
from planner.cost.estimate import estimate
from planner.hardware import Cluster, list_profiles, load_profile
from planner.plan import Plan, layout_errors
from planner.report import layout_summary, outside_summary

NODE_FACTORS = (1, 2, 3)          # extra nodes tried first ...
NODE_MULTIPLES = (2, 3, 4, 6, 8, 16)  # ... then multiples of the node count


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _limit(result) -> float:
    return (1 - result.options.headroom) * result.cluster.profile.gpu.memory_bytes


def node_counts(nodes: int) -> list:
    return sorted({nodes + k for k in NODE_FACTORS} | {nodes * k for k in NODE_MULTIPLES})


def more_nodes(result, search_fn):
    """(nodes, best candidate) of the smallest node count tried where something fits."""
    base = result.cluster
    opts = dataclasses.replace(result.options, top=1, allow_fewer_gpus=False)
    for nodes in node_counts(base.num_nodes):
        bigger = Cluster(profile=base.profile, num_nodes=nodes)
        found = search_fn(result.model, bigger, result.job, opts)
        if found.ranked:
            return nodes, found.ranked[0]
    return None


def _variant(result, cand, **changes):
    lay = dataclasses.replace(cand.layout, **changes)
    plan = cand.plan
    if layout_errors(plan.model, plan.cluster, plan.job, lay):
        return None
    return estimate(Plan(model=plan.model, cluster=plan.cluster, job=plan.job, layout=lay))


def bigger_gpus(result, search_fn) -> list:
    """(profile name, best candidate) for profiles with more memory per GPU where it fits."""
    here = result.cluster.profile
    out = []
    for name in list_profiles():
        prof = load_profile(name)
        if prof.gpu.memory_bytes <= here.gpu.memory_bytes or not prof.supports(
                result.job.precision) or name == "cpu":
            continue
        cluster = Cluster(profile=prof, num_nodes=result.cluster.num_nodes)
        found = search_fn(result.model, cluster, result.job,
                          dataclasses.replace(result.options, top=1, allow_fewer_gpus=False))
        if found.ranked:
            out.append((name, found.ranked[0]))
    return out


def offload_line(result, search_fn):
    """The best plan when the search may also offload to host memory, with its throughput
    against the same layout without offload (which does not fit); None where nothing does or
    offload was already searched."""
    if result.options.offload is None or not result.cluster.profile.host.known:
        return None
    found = search_fn(result.model, result.cluster, result.job,
                      dataclasses.replace(result.options, top=1, offload=None))
    if not found.ranked or found.ranked[0].layout.offload == "none":
        return None
    best = found.ranked[0]
    plain = _variant(result, best, offload="none")
    delta = f" at {100 * (best.tokens_per_s / plain.tokens_per_s - 1):+.0f}% throughput " \
        f"against the same layout without it ({_gib(plain.memory.total_bytes)} per GPU)" \
        if plain else ""
    return (f"fits with {best.layout.offload} offload: {layout_summary(best.layout)} at "
            f"{_gib(best.total_bytes)} per GPU and "
            f"{_gib(best.estimate.memory.host_bytes_per_node)} host memory per node, "
            f"{best.tokens_per_s:,.0f} tokens/s{delta}")


def advice(result, search_fn) -> list:
    """Lines saying that nothing fits and what would; result.closest must be set."""
    c = result.closest
    mem = c.estimate.memory
    lines = [f"Nothing fits: every valid layout of {result.cluster.world_size} GPUs needs more "
             f"than {_gib(_limit(result))} per GPU ({100 * (1 - result.options.headroom):.0f}% "
             f"of {_gib(mem.capacity_bytes)}).",
             f"  least memory: {layout_summary(c.layout)} needs {_gib(mem.total_bytes)} "
             f"(weights {_gib(mem.weights_bytes)}, gradients {_gib(mem.gradients_bytes)}, "
             f"optimizer {_gib(mem.optimizer_bytes)}, activations {_gib(mem.activations_bytes)})",
             f"  outside tensors: {outside_summary(mem)}"]
    lines += [f"  {x}" for x in relaxations(result, search_fn)]
    return lines


def relaxations(result, search_fn) -> list:
    c = result.closest
    mem = c.estimate.memory
    out = []
    if c.layout.zero_stage != 3 and c.layout.dp > 1:
        est = _variant(result, c, zero_stage=3)
        if est:
            out.append(f"ZeRO-3 on that layout: {_gib(est.memory.total_bytes)} per GPU")
    if c.layout.recompute != "full" or c.layout.recompute_every > 1:
        est = _variant(result, c, recompute="full", recompute_every=1)
        if est:
            out.append(f"recompute=full cuts activations from {_gib(mem.activations_bytes)} to "
                       f"{_gib(est.memory.activations_bytes)} (total "
                       f"{_gib(est.memory.total_bytes)})")
    if result.job.fp8:  # what FP8 does to memory on that layout: little (README, FP8)
        gain = c.estimate.fp8_gain()
        out.append(f"FP8 is no memory lever: in bf16 that layout needs "
                   f"{_gib(gain['bf16_total_bytes'])} ({_gib(abs(gain['memory_saved_bytes']))} "
                   f"{'more' if gain['memory_saved_bytes'] >= 0 else 'less'}; weights, "
                   f"gradients and optimizer states are the same)")
    if c.layout.micro_batch > 1:
        lay = c.layout
        est = _variant(result, c, micro_batch=1,
                       num_microbatches=lay.micro_batch * lay.num_microbatches)
        if est:
            out.append(f"micro-batch 1 instead of {lay.micro_batch}: activations "
                       f"{_gib(mem.activations_bytes)} -> {_gib(est.memory.activations_bytes)} "
                       f"(total {_gib(est.memory.total_bytes)})")
    line = offload_line(result, search_fn)
    if line:
        out.append(line)
    if mem.total_bytes <= mem.capacity_bytes:
        need = 1 - mem.total_bytes / mem.capacity_bytes
        out.append(f"it fits with less headroom: --headroom {int(need * 100) / 100:.2f} "
                   f"({layout_summary(c.layout)})")
    found = more_nodes(result, search_fn)
    if found:
        nodes, best = found
        out.append(f"{nodes - result.cluster.num_nodes} more node(s) ({nodes} nodes, "
                   f"{best.num_gpus} GPUs) fit: {layout_summary(best.layout)} at "
                   f"{_gib(best.total_bytes)} per GPU, {best.tokens_per_s:,.0f} tokens/s")
    else:
        out.append(f"no node count up to {node_counts(result.cluster.num_nodes)[-1]} fits")
    for name, best in bigger_gpus(result, search_fn):
        out.append(f"on {name} ({result.cluster.num_nodes} node(s)): "
                   f"{layout_summary(best.layout)} at {_gib(best.total_bytes)} per GPU, "
                   f"{best.tokens_per_s:,.0f} tokens/s")
    return out


def one_line(result, lines: list) -> str:
    """The error message: the least memory needed and the first relaxation that fits."""
    c = result.closest
    fix = next((x.strip() for x in lines[3:] if "fit" in x), "see the advice above")
    # shape-level reasons (why tp or dp cannot take the obvious value), not schedule details
    structural = [r for r in result.rejections if r.key in rules.SHAPE_KEYS]
    also = f" (also ruled out: {structural[0].example})" if structural else ""
    return (f"nothing fits on {result.cluster.world_size} GPUs: the best valid layout needs "
            f"{_gib(c.total_bytes)} per GPU, {_gib(_limit(result))} allowed{also}; {fix}")


def no_valid_layout(result) -> str:
    """One line for a request with no structurally valid layout at all."""
    # precision and sequence length rule out every layout: say them first
    first = sorted(result.rejections, key=lambda r: r.key not in rules.REQUEST_KEYS)
    reasons = "; ".join(f"{r.example} ({r.count:,} layouts)" for r in first[:3])
    return f"no valid layout for {result.cluster.world_size} GPUs: {reasons}"
