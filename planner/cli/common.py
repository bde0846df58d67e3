"""Flags shared by sub-commands: model, cluster, job and layout; turning them into inputs."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from planner.engines import RECOMPUTE, SCHEDULES
from planner.hardware import load_cluster
from planner.job import ATTENTION, PRECISIONS, Job
from planner.presets import load_model

if TYPE_CHECKING:  # planner.plan loads numpy (planner.rules): imported when a plan is built
    from planner.plan import Plan


def add_inputs(parser, required: bool = True) -> None:
    """--model/--cluster/--nodes and the job flags."""
    parser.add_argument("--model", required=required,
                        help="preset name (planner models), spec JSON or HF config.json")
    parser.add_argument("--cluster", required=required,
                        help="profile name (planner profiles) or profile JSON path")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--global-batch", type=int, required=required, help="sequences per step")
    parser.add_argument("--seq-len", type=int, required=required, help="tokens per sequence")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--engine", choices=("torch", "megatron"), default="torch",
                        help="whose activation/overlap behaviour to model (default torch)")
    parser.add_argument("--attention", choices=ATTENTION, default="flash",
                        help="attention kernels: flash (default), fused softmax, or eager")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_layout(parser) -> None:
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (needs tp > 1)")
    parser.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3")
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    parser.add_argument("--virtual-stages", type=int, default=1)
    parser.add_argument("--recompute", choices=RECOMPUTE, default="none")
    parser.add_argument("--mesh-order", default="pp,dp,tp",
                        help="mesh axes outermost to innermost (default pp,dp,tp)")
    parser.add_argument("--plan", help="read the whole plan from a plan.json instead")


def build_inputs(args) -> tuple:
    """(ModelSpec, Cluster, Job) from the shared flags."""
    model = load_model(args.model)
    cluster = load_cluster(args.cluster, args.nodes)
    job = Job(global_batch=args.global_batch, seq_len=args.seq_len, precision=args.precision,
              attention=args.attention, engine=args.engine)
    return model, cluster, job


def build_plan(args) -> Plan:
    """A validated Plan from --plan or from the model/cluster/job/layout flags."""
    from planner.plan import Layout, Plan
    if args.plan:
        return Plan.load(args.plan)
    missing = [f for f in ("model", "cluster", "global_batch", "seq_len")
               if getattr(args, f) is None]
    if missing:
        raise ValueError(f"--{missing[0].replace('_', '-')} is required (or give --plan)")
    model, cluster, job = build_inputs(args)
    per_replica = args.global_batch // max(1, args.dp)
    if args.global_batch % max(1, args.dp) or per_replica % max(1, args.micro_batch):
        raise ValueError(f"global batch {args.global_batch} is not divisible by dp {args.dp} x "
                         f"micro batch {args.micro_batch}")
    layout = Layout(dp=args.dp, tp=args.tp, pp=args.pp, sequence_parallel=args.sp,
                    zero_stage=args.zero, micro_batch=args.micro_batch,
                    num_microbatches=per_replica // args.micro_batch, schedule=args.schedule,
                    virtual_stages=args.virtual_stages, recompute=args.recompute,
                    mesh_order=tuple(a.strip() for a in args.mesh_order.split(",")))
    return Plan(model=model, cluster=cluster, job=job, layout=layout)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1)
    sys.stdout.write("\n")
