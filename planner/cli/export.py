"""`planner export plan.json --to torchrun|slurm|deepspeed|megatron`: hand a plan to a launcher
or to the engine a team already uses."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from planner import export
from planner.cli.common import print_json

if TYPE_CHECKING:  # planner.plan loads numpy: imported in run()
    from planner.plan import Plan


def add_parser(sub):
    p = sub.add_parser("export", help="plan.json -> torchrun lines, sbatch script, DeepSpeed "
                                      "config or Megatron-LM arguments")
    p.add_argument("plan", help="plan.json from planner suggest --out")
    p.add_argument("--to", required=True, choices=sorted(export.FORMATS))
    p.add_argument("--out", help="write to this file instead of standard output")
    p.add_argument("--steps", type=int, default=export.DEFAULT_STEPS,
                   help=f"training steps for runtime.train (default {export.DEFAULT_STEPS})")
    p.add_argument("--nodes-hostfile", help="one host per line ('host slots=8' accepted); "
                                            "node 0 is the rendezvous host")
    p.add_argument("--master-addr", help="rendezvous host name or IP address "
                                         "(default: first hostfile entry)")
    p.add_argument("--master-port", type=int, default=export.DEFAULT_PORT,
                   help=f"rendezvous port of a multi-node run (default {export.DEFAULT_PORT}; "
                        "the sbatch script takes $MASTER_PORT first)")
    p.add_argument("--rdzv-id", help="torchrun rendezvous id of a multi-node run, of the "
                                     "characters A-Za-z0-9._- (default: the default job name; "
                                     "Slurm: the job id)")
    p.add_argument("--plan-path", help="path of plan.json as the nodes see it "
                                       "(default: the given path)")
    p.add_argument("--job-name", help="Slurm job name, of the characters A-Za-z0-9._- "
                                      "(default: model name with other characters as '-', "
                                      "plus the layout)")
    p.add_argument("--partition", help="Slurm partition(s), comma-separated, of A-Za-z0-9._-")
    p.add_argument("--time", default="24:00:00",
                   help="Slurm time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S or UNLIMITED "
                        "(default 24:00:00)")
    p.add_argument("--cpus-per-task", type=int,
                   help="Slurm CPUs for each node's task (it runs all of the node's ranks; "
                        "default: every CPU of the node, $SLURM_CPUS_ON_NODE)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: the format, the file written (or the text "
                        "itself without --out) and the notes")
    return p


def _text(plan: Plan, args, notes: list) -> str:
    plan_path = args.plan_path or args.plan
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.to == "torchrun":
        hosts = export.read_hostfile(args.nodes_hostfile) if args.nodes_hostfile else None
        return export.torchrun(plan, plan_path=plan_path, steps=args.steps, hosts=hosts,
                               master_addr=args.master_addr, master_port=args.master_port,
                               rdzv_id=args.rdzv_id)
    if args.to == "slurm":
        return export.slurm(plan, plan_path=plan_path, steps=args.steps, job_name=args.job_name,
                            time_limit=args.time, partition=args.partition,
                            master_port=args.master_port, cpus_per_task=args.cpus_per_task)
    if args.to == "deepspeed":
        notes.append(export.deepspeed_config(plan)["comment"])
        return export.deepspeed(plan)
    text = export.megatron(plan)
    names = ", ".join(name for name, _ in export.MEGATRON_PLACEHOLDERS.values())
    notes.append(f"set {names} before sourcing it (the plan does not choose them)")
    return text


def run(args) -> int:
    from planner.plan import Plan
    notes: list[str] = []
    text = _text(Plan.load(args.plan), args, notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        if not args.json:
            print(f"wrote {args.to} export to {args.out}", file=sys.stderr)
    if args.json:  # the text itself only when no file holds it
        print_json({"to": args.to, "wrote": args.out, "bytes": len(text.encode()),
                    "text": None if args.out else text, "notes": notes})
    elif not args.out:
        sys.stdout.write(text)
    return 0
