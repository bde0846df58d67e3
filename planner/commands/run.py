"""`planner run plan.json`: train under the plan on this host with torchrun (runtime/)."""


def add_parser(sub):
    p = sub.add_parser("run", help="train for real under a plan on this host (torchrun)")
    p.add_argument("plan", help="plan.json from planner suggest / estimate --out")
    p.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    p.add_argument("runtime_args", nargs="*",
                   help="extra runtime.train flags after --, e.g. -- --data corpus.txt")
    return p


def run(args) -> int:
    # imported here: the runtime pulls in torch, which `planner` must not load at start-up
    from runtime.launch import run_plan
    return run_plan(args.plan, args.steps, args.runtime_args)
