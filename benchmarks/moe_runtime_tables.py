"""The runtime's MoE tables for the README ("MoE in the runtime"): parity with one process of
every expert-parallel case of tests/test_runtime_moe.py, per-rank model-state bytes measured vs
the planner's inventory, and the all-to-all census. CPU, gloo, about 3 minutes on 2 cores.

    python -m benchmarks.moe_runtime_tables"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _layout(lay) -> str:
    parts = [f"{k}{getattr(lay, k)}" for k in ("pp", "dp", "tp", "ep") if getattr(lay, k) > 1]
    extra = [lay.schedule] if lay.pp > 1 else []
    extra += [f"recompute {lay.recompute}"] if lay.recompute != "none" else []
    return " ".join(["x".join(parts), f"ZeRO-{lay.zero_stage}", *extra])


def parity_and_memory() -> None:
    import test_runtime_moe as t
    from runtime_dist import make_plan
    print("| case | model | layout | max loss diff | max param diff | ranks: weights+grads+"
          "AdamW bytes, runtime = planner |")
    print("|---|---|---|---|---|---|")
    for name, (spec, lay) in t.CASES.items():
        loss, param, _ = t.diffs(name)
        plan = make_plan(lay, spec)
        rows = set()
        for coords, record in t.results()[name]["ranks"]:
            want = t.planner_state_bytes(plan, coords)
            got = sum(record[k] for k in want)
            rows.add(f"{got:,}" + ("" if got == sum(want.values()) else " (planner "
                                   f"{sum(want.values()):,})"))
        print(f"| {name} | {spec.name} | {_layout(lay)} | {loss:.1e} | {param:.1e} | "
              f"{' / '.join(sorted(rows))} |")


def census() -> None:
    import test_runtime_moe as t
    from runtime_dist import corpus_tokens, make_plan, run_world
    plan = make_plan(t.CENSUS, t.MOE)
    ranks = run_world(2, t._census_rank, plan, corpus_tokens())
    want = t.a2a_bytes_per_direction(plan)
    print(f"\ncost-model formula: tokens x top-k x hidden x bytes = "
          f"{t.CENSUS.micro_batch * plan.job.seq_len} x {t.MOE.moe.experts_per_token} x "
          f"{t.MOE.hidden_size} x 4 = {want:,} bytes per direction per MoE layer per micro-batch")
    print("| rank | kind | calls | sent bytes (each) | received bytes (each) | sent to the peer |")
    print("|---|---|---|---|---|---|")
    for rank, r in enumerate(ranks):
        for kind in ("dispatch", "combine", "combine_backward", "dispatch_backward"):
            es = [e for e in r["log"] if e["kind"] == kind]
            sent = sorted({e["bytes"] for e in es})
            recv = sorted({e["recv_bytes"] for e in es})
            remote = sum(e["remote_bytes"] for e in es) / sum(e["bytes"] for e in es)

            def span(v):
                return f"{v[0]:,}" if len(v) == 1 else f"{v[0]:,} .. {v[-1]:,}"
            print(f"| {rank} | {kind} | {len(es)} | {span(sent)} | {span(recv)} | "
                  f"{remote:.0%} |")


if __name__ == "__main__":
    parity_and_memory()
    census()
