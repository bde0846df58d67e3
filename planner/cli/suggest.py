"""`planner suggest`: search every valid layout, rank, explain, write the chosen plan."""

from planner import limits
from planner.cli.common import (add_compile, add_dp_shard, add_gpus, add_inputs, add_recompute,
                                add_trace, bounded_float, bounded_int, build_inputs,
                                check_output, print_json, save_plan, traced_context)

# = planner.search.ranking.OBJECTIVES (tests/test_imports.py checks); not imported from there:
# that module loads the search and the cost model, which building the parser must not
OBJECTIVES = ("throughput", "min-gpus", "time-to-train")


def add_parser(sub):
    p = sub.add_parser("suggest", help="search every layout and rank the ones that fit")
    add_inputs(p)
    add_recompute(p, search=True)
    add_dp_shard(p, search=True)
    p.add_argument("--offload", choices=("none", "optimizer", "params", "any"), default="none",
                   help="CPU offload to plan with; any: search the offloads the engine runs "
                        "(default none; the nothing-fits advice tries them)")
    plans = bounded_int(1, limits.MAX_RANKED_PLANS)
    add_gpus(p)
    p.add_argument("--top", type=plans, default=10, help="plans to show (default 10)")
    p.add_argument("--out", help="write the best plan (or --rank K) with its estimate here")
    p.add_argument("--rank", type=plans, default=1, help="which ranked plan --out writes")
    p.add_argument("--objective", choices=OBJECTIVES, default="throughput",
                   help="throughput (default); min-gpus: fewest GPUs reaching "
                        "--target-tokens-per-s; time-to-train: for --token-budget tokens")
    p.add_argument("--max-tp", type=bounded_int(0, limits.MAX_GPUS_PER_NODE), default=0,
                   help="largest TP degree to try (default: GPUs per node)")
    p.add_argument("--headroom", type=bounded_float(0.0, 1.0, hi_open=True), default=0.10,
                   help="memory fraction to keep free (default 0.10)")
    p.add_argument("--allow-fewer-gpus", action="store_true",
                   help="also try fewer GPUs (whole nodes; any count within one node)")
    p.add_argument("--target-tokens-per-s", type=bounded_float(0.0, limits.MAX_TOKENS_PER_S),
                   default=0.0, help="drop plans slower than this (min-gpus objective)")
    p.add_argument("--token-budget", type=bounded_float(0.0, limits.MAX_TOKEN_BUDGET),
                   default=0.0, help="tokens to train, for time-to-train (e.g. 2e12)")
    add_compile(p)  # on: every layout compiled; off (default): none
    add_trace(p)
    return p


def _options(args):
    from planner.search.ranking import SearchOptions
    return SearchOptions(objective=args.objective, top=max(args.top, args.rank),
                         max_tp=args.max_tp, headroom=args.headroom,
                         allow_fewer_gpus=args.allow_fewer_gpus,
                         target_tokens_per_s=args.target_tokens_per_s,
                         token_budget=args.token_budget, compile=args.compile,
                         recompute=args.recompute, recompute_every=args.recompute_every,
                         dp_shard=args.dp_shard,
                         offload=None if args.offload == "any" else args.offload)


def run(args) -> int:
    from planner.search.ranking import search  # the search and the cost model: only here
    if args.out:
        check_output(args.out)  # before the search, not after it
    model, cluster, job = build_inputs(args)  # with --gpus
    if args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    context, trace = traced_context(args, model, job)
    with context:  # the relaxations of a no-fit search and the explanations too
        if trace is not None and not args.json:
            from planner.traced import comparison_text
            print(comparison_text(trace, model, job, 1) + "\n")
        return _searched(args, search(model, cluster, job, _options(args)))


def _searched(args, result) -> int:
    if not result.ranked:
        return _nothing(result, args)
    if args.rank > len(result.ranked):
        raise ValueError(f"--rank {args.rank} but only {len(result.ranked)} plan(s) qualify")
    chosen = result.ranked[args.rank - 1]
    if args.out:
        save_plan(chosen.saved(), args.out)
    if args.json:
        print_json([c.estimate.to_dict() for c in result.ranked[:args.top]])
        return 0
    from planner.search.explain import result_text
    print(result_text(result))
    if args.out:
        print(f"\nwrote plan #{args.rank} to {args.out}; next: planner export {args.out} "
              f"--to torchrun (or planner run {args.out})")
    return 0


def _nothing(result, args) -> int:
    from planner.search import nofit
    from planner.search.ranking import search
    if args.json:
        print_json([])
    target = [r for r in result.rejections if r.key == "target"]
    if target:
        raise ValueError(f"no plan reaches {args.target_tokens_per_s:,.0f} tokens/s: "
                         f"{target[0].example}")
    if result.closest is None:
        raise ValueError(nofit.no_valid_layout(result))
    lines = nofit.advice(result, search)
    if not args.json:  # with --json: standard output stays JSON, the error line summarises
        print("\n".join(lines))
    raise ValueError(nofit.one_line(result, lines))
