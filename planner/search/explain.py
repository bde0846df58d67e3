"""Words and tables for search results: why each ranked plan beats the next, the ranked table,
and the rejected layouts grouped by reason (presentation only: every number comes from
estimate() or the search)."""

from planner.units import fmt_seconds

# TimeBreakdown fields a plan can win on, with the words for them
TIME_PARTS = [("bubble_s", "pipeline bubble"), ("tp_comm_s", "TP communication"),
              ("pp_comm_s", "pipeline sends"), ("cp_comm_s", "CP communication"),
              ("ep_comm_s", "expert all-to-all"),
              ("dp_comm_exposed_s", "exposed DP communication"),
              ("recompute_s", "recomputation"), ("compute_s", "compute on the slowest stage"),
              ("optimizer_s", "optimizer time")]
LAYOUT_FIELDS = [("dp", "dp"), ("tp", "tp"), ("pp", "pp"), ("cp", "cp"), ("cp_comm", "cp_comm"),
                 ("ep", "ep"), ("etp", "etp"),
                 ("sequence_parallel", "SP"),
                 ("zero_stage", "ZeRO"), ("micro_batch", "micro-batch"), ("recompute", "recompute"),
                 ("recompute_every", "recompute every"), ("dp_shard", "dp shard"),
                 ("offload", "offload")]
def recompute_name(lay) -> str:
    """'op', or 'op/2' for the policy on every 2nd block."""
    return lay.recompute + (f"/{lay.recompute_every}" if lay.recompute_every > 1 else "")


TIE = 5e-4  # relative tokens/s difference below which two plans count as equally fast


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def schedule_name(lay) -> str:
    if lay.pp == 1:
        return "-"
    return lay.schedule + (f"(v={lay.virtual_stages})" if lay.virtual_stages > 1 else "")


def layout_diff(a, b) -> str:
    """What differs between two layouts, e.g. 'pp 2 vs 4, schedule zbv(v=2) vs 1f1b'."""
    out = [f"{name} {getattr(a, f)} vs {getattr(b, f)}" for f, name in LAYOUT_FIELDS
           if getattr(a, f) != getattr(b, f)]
    if schedule_name(a) != schedule_name(b):
        out.append(f"schedule {schedule_name(a)} vs {schedule_name(b)}")
    if a.world_size != b.world_size:
        out.insert(0, f"{a.world_size} vs {b.world_size} GPUs")
    return ", ".join(out) or "same layout"


def _part_phrase(key: str, label: str, ta, tb) -> str:
    if key == "bubble_s":
        return (f"less pipeline bubble ({100 * ta.bubble_fraction:.1f}% vs "
                f"{100 * tb.bubble_fraction:.1f}% of the pipeline)")
    return f"less {label} ({fmt_seconds(getattr(ta, key))} vs {fmt_seconds(getattr(tb, key))})"


def why_better(a, b, objective: str = "throughput") -> str:
    """One line: why candidate `a` ranks above candidate `b`."""
    diff = f" [{layout_diff(a.layout, b.layout)}]"
    if objective == "min-gpus" and a.num_gpus < b.num_gpus:
        return f"fewer GPUs ({a.num_gpus} vs {b.num_gpus}){diff}"
    gain = a.tokens_per_s / b.tokens_per_s - 1
    if abs(gain) < TIE:
        if round(a.total_bytes / 2**20) < round(b.total_bytes / 2**20):
            return (f"as fast ({100 * gain:+.2f}% tokens/s), less memory "
                    f"({_gib(a.total_bytes)} vs {_gib(b.total_bytes)}){diff}")
        if round(a.tokens_per_s, 3) > round(b.tokens_per_s, 3):
            return f"marginally faster ({100 * gain:+.2f}% tokens/s){diff}"
        return f"as fast and as large; simpler layout first (fixed tie-break){diff}"
    ta, tb = a.estimate.time, b.estimate.time
    key, label = max(TIME_PARTS, key=lambda p: getattr(tb, p[0]) - getattr(ta, p[0]))
    return f"{100 * gain:+.1f}% tokens/s: {_part_phrase(key, label, ta, tb)}{diff}"


def ranked_rows(result) -> list:
    """The top-k table as rows (dicts), one per ranked plan."""
    rows = []
    budget = result.options.token_budget
    with_cp = any(c.layout.cp > 1 for c in result.ranked)  # the column where a plan splits
    for i, c in enumerate(result.ranked, 1):
        lay = c.layout
        row = {"rank": i, "GPUs": c.num_gpus, "dp": lay.dp, "tp": lay.tp, "pp": lay.pp}
        if with_cp:
            row["cp"] = f"{lay.cp} {lay.cp_comm}" if lay.cp > 1 else "1"
        if result.model.moe is not None:  # expert parallel and expert tensor parallel (MoE models)
            row.update(ep=lay.ep, etp=lay.etp)
        row.update({"SP": "y" if lay.sequence_parallel else "-", "ZeRO": lay.zero_stage,
                    "micro-batch": f"{lay.micro_batch}x{lay.num_microbatches}",
                    "schedule": schedule_name(lay), "recompute": recompute_name(lay),
                    "mem/GPU GiB": round(c.total_bytes / 2**30, 1),
                    "step s": round(c.step_s, 3),
                    "tokens/s": round(c.tokens_per_s), "MFU %": round(100 * c.mfu, 1)})
        # hybrid sharding and CPU offload: columns only where a ranked plan uses them
        if any(x.layout.dp_shard for x in result.ranked):
            row["shard"] = lay.dp_shard or "-"
        if any(x.layout.offload != "none" for x in result.ranked):
            row["offload"] = lay.offload
            row["host GiB/node"] = round(c.estimate.memory.host_bytes_per_node / 2**30, 1)
        if budget:
            row["days"] = round(budget / c.tokens_per_s / 86400, 2)
            row["GPU-hours"] = round(budget / c.tokens_per_s / 3600 * c.num_gpus)
        rows.append(row)
    return rows


def ranked_table(result):
    """The top-k table as a DataFrame (the UI's)."""
    import pandas as pd
    rows = ranked_rows(result)
    return pd.DataFrame(rows).set_index("rank") if rows else pd.DataFrame()


def text_table(rows: list) -> str:
    """Rows (dicts with the same keys) as a fixed-width text table, numbers right-aligned
    (what `planner suggest` prints; no pandas, so the command starts fast)."""
    keys = list(rows[0])
    cells = [[f"{r[k]:,}" if isinstance(r[k], int) and k in ("tokens/s", "GPU-hours")
              else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[j]) for c in cells)) for j, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def reasons(result) -> list:
    """'k > k+1: why' lines for the ranked plans."""
    r = result.ranked
    return [f"{i + 1} > {i + 2}: {why_better(r[i], r[i + 1], result.options.objective)}"
            for i in range(len(r) - 1)]


def rejected_table(result):
    import pandas as pd
    rows = [{"reason": r.label, "layouts": r.count, "example": r.example}
            for r in result.rejections]
    return pd.DataFrame(rows, columns=["reason", "layouts", "example"])


def result_text(result) -> str:
    """Everything `planner suggest` prints for a search with at least one plan."""
    lines = [f"{result.model.name} on {result.cluster.world_size} x "
             f"{result.cluster.profile.gpu.name}; batch {result.job.global_batch} x "
             f"{result.job.seq_len}; objective {result.options.objective}; "
             f"{'every block torch.compiled; ' if result.options.compile else ''}"
             f"{result.num_considered:,} layouts considered, {result.num_fit:,} fit "
             f"(headroom {100 * result.options.headroom:.0f}%), "
             f"searched in {result.elapsed_s:.2f} s", "", text_table(ranked_rows(result)), ""]
    lines += ["Why each beats the next:"] + [f"  {x}" for x in reasons(result)]
    if result.job.fp8:  # what the user's choice of FP8 buys on the best layout
        from planner.report import fp8_gain_text
        lines += ["", f"#1: {fp8_gain_text(result.ranked[0].estimate.fp8_gain())}"]
    if result.rejections:
        lines += ["", "Rejected layouts by reason (count, reason: example):"]
        lines += [f"  {r.count:>9,}  {r.label}: {r.example}" for r in result.rejections]
    return "\n".join(lines)
