"""Flags shared by sub-commands: model, cluster, job and layout; turning them into inputs."""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
from typing import TYPE_CHECKING

from planner import limits
from planner.engines import CP_COMMS, OFFLOADS, RECOMPUTE, SCHEDULES, engine
from planner.hardware import load_cluster, with_gpus
from planner.job import (ATTENTION, DEFAULT_MOE_IMBALANCE, FP8_RECIPES, MAX_LABELS,
                         MAX_MOE_IMBALANCE, PRECISIONS, TASKS, Job)
from planner.lora import DEFAULT_TARGETS, MAX_RANK, TARGETS, LoraSpec, parse_targets
from planner.presets import load_model
from planner.schema import show_path

if TYPE_CHECKING:  # planner.plan loads numpy (planner.rules): imported when a plan is built
    from planner.plan import Plan


def add_inputs(parser, required: bool = True) -> None:
    """--model/--cluster/--nodes and the job flags."""
    parser.add_argument("--model", required=required,
                        help="preset name (planner models), spec JSON or HF config.json")
    parser.add_argument("--cluster", required=required,
                        help="profile name (planner profiles) or profile JSON path; `cpu` "
                             "plans for the CPU processes of this machine")
    parser.add_argument("--nodes", type=bounded_int(1, limits.MAX_NODES), default=1,
                        help="number of nodes")
    parser.add_argument("--global-batch", type=bounded_int(1, limits.MAX_GLOBAL_BATCH),
                        required=required, help="sequences per step")
    parser.add_argument("--seq-len", type=bounded_int(1, limits.MAX_SEQ_LEN),
                        required=required, help="tokens per sequence")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16",
                        help="training precision (V100 profiles have no bf16: use fp16; fp8 "
                             "runs the linear layers' GEMMs in FP8, the rest in bf16, on "
                             "Hopper-class profiles)")
    parser.add_argument("--fp8-recipe", choices=FP8_RECIPES, default=None,
                        help="FP8 scaling recipe with --precision fp8 (default: the engine's "
                             "first: tensorwise for torch, delayed for megatron)")
    parser.add_argument("--engine", choices=("torch", "megatron", "deepspeed"), default="torch",
                        help="whose activation/overlap behaviour to model")
    parser.add_argument("--attention", choices=ATTENTION, default="flash",
                        help="attention kernels: flash, fused softmax, or eager")
    parser.add_argument("--moe-imbalance", type=bounded_float(1.0, MAX_MOE_IMBALANCE),
                        default=DEFAULT_MOE_IMBALANCE,
                        help="MoE models: busiest expert's tokens over the mean (default "
                             f"{DEFAULT_MOE_IMBALANCE}: Switch Transformer's capacity factor)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_task(parser)


def add_task(parser) -> None:
    """--task, --num-labels and the LoRA flags (planner/job.py, planner/lora.py)."""
    parser.add_argument("--task", choices=TASKS, default="pretrain",
                        help="pretrain (LM loss), classify (sequence classification head), "
                             "sft (causal LM, prompt masked out of the loss)")
    parser.add_argument("--num-labels", type=bounded_int(2, MAX_LABELS), default=2,
                        help="classes of the classify head (default 2)")
    parser.add_argument("--lora-rank", type=bounded_int(1, MAX_RANK), default=None,
                        help="train LoRA adapters of this rank on a frozen base (default: "
                             "full fine-tuning)")
    parser.add_argument("--lora-alpha", type=float, default=16.0,
                        help="LoRA scale numerator: updates are alpha / rank x B A x")
    parser.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                        help=f"adapted projections, of {','.join(TARGETS)}")
    parser.add_argument("--lora-base-4bit", action="store_true",
                        help="QLoRA-style 4-bit frozen base (memory model only; the runtime "
                             "keeps the base in the training precision)")


def lora_from_args(args):
    """The LoraSpec the flags ask for, or None; LoRA flags without --lora-rank are refused."""
    rank = getattr(args, "lora_rank", None)
    if rank is None:
        given = getattr(args, "given", None) or ()
        stray = [f for f in ("lora_alpha", "lora_targets", "lora_base_4bit") if f in given]
        if stray:
            raise ValueError(f"--{stray[0].replace('_', '-')} needs --lora-rank")
        return None
    return LoraSpec(rank=rank, alpha=args.lora_alpha, targets=parse_targets(args.lora_targets),
                    base_4bit=bool(args.lora_base_4bit))


def add_trace(parser) -> None:
    parser.add_argument("--trace-activations", action="store_true",
                        help="use the activation bytes transformers' implementation of the "
                             "model saves (traced on the meta device; needs the hf extra; "
                             "cached) instead of the analytic count, and show both")


def traced_context(args, spec, job):
    """(context manager, comparison line) for --trace-activations, or a null context."""
    import contextlib
    if not getattr(args, "trace_activations", False):
        return contextlib.nullcontext(), None
    from planner import traced  # torch and transformers: only with the flag
    from planner.cost.traced_bytes import use
    trace = traced.for_job(spec, job, getattr(args, "model", None))
    return use(trace), trace


def add_gpus(parser) -> None:
    """--gpus: part of the cluster (one GPU of a DGX, 4 of 8), planner.hardware.with_gpus."""
    parser.add_argument("--gpus", type=bounded_int(0, limits.MAX_GPUS), default=0,
                        help="use only this many GPUs of the nodes (default: all; part of a "
                             "node with --nodes 1, else whole nodes)")
def add_recompute(parser, search: bool) -> None:
    """--recompute and --recompute-every; for the search, unset means 'try them all'."""
    parser.add_argument("--recompute", choices=RECOMPUTE, default=None if search else "none",
                        help="activation recomputation: none, selective (attention core), op "
                             "(torchtitan's op-level policy), full" +
                             (" (default: search them)" if search else ""))
    parser.add_argument("--recompute-every", type=bounded_int(1, limits.MAX_LAYERS),
                        default=None if search else 1,
                        help="apply the policy to every K-th block (blocks K-1, 2K-1, ...), "
                             "the others none" + (" (default: search 1, 2, 4)" if search
                                                  else " (default 1)"))


def add_dp_shard(parser, search: bool) -> None:
    """--dp-shard: hybrid sharding's shard group (the rest of dp replicates)."""
    parser.add_argument("--dp-shard", type=bounded_int(0, limits.MAX_DEGREE),
                        default=None if search else 0,
                        help="hybrid sharding: ZeRO shards over groups of S consecutive dp "
                             "ranks and replicates across dp/S groups; 0 = all of dp" +
                             (" (default: search the shard groups)" if search
                              else " (default 0)"))


def add_layout(parser) -> None:
    degree = bounded_int(1, limits.MAX_DEGREE)
    parser.add_argument("--dp", type=degree, default=1, help="data-parallel degree")
    parser.add_argument("--tp", type=degree, default=1, help="tensor-parallel degree")
    parser.add_argument("--pp", type=degree, default=1, help="pipeline-parallel degree")
    parser.add_argument("--cp", type=degree, default=1,
                        help="context-parallel degree: each sequence split over cp ranks")
    parser.add_argument("--cp-comm", choices=CP_COMMS, default="allgather",
                        help="context-parallel attention: all-gather of K/V (Llama 3), ring "
                             "(Ring Attention) or a2a (DeepSpeed-Ulysses); with --cp > 1")
    parser.add_argument("--ep", type=degree, default=1,
                        help="expert-parallel degree (MoE models; folded over tp x dp)")
    parser.add_argument("--etp", type=degree, default=1,
                        help="expert tensor-parallel degree (MoE models; megatron engine)")
    parser.add_argument("--micro-batch", type=bounded_int(1, limits.MAX_GLOBAL_BATCH), default=1,
                        help="sequences per micro-batch (micro-batches = global batch / "
                             "(dp x this))")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (needs tp > 1)")
    parser.add_argument("--zero", type=bounded_int(0, 3), default=0, help="ZeRO stage 0-3")
    add_dp_shard(parser, search=False)
    parser.add_argument("--offload", choices=OFFLOADS, default="none",
                        help="CPU offload: the optimizer states (ZeRO-Offload) or also the "
                             "parameters, into host memory (default none)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b",
                        help="pipeline schedule (with pp > 1)")
    parser.add_argument("--virtual-stages", type=bounded_int(1, limits.MAX_LAYERS), default=1,
                        help="model chunks per pipeline rank (interleaved schedules, zbv: 2)")
    add_recompute(parser, search=False)
    add_compile(parser)
    parser.add_argument("--mesh-order", default="pp,dp,tp",
                        help="mesh axes outermost to innermost (cp goes right after dp "
                             "unless named)")
    add_gpus(parser)
    parser.add_argument("--plan", help="read the whole plan from a plan.json instead")


def add_compile(parser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block (torch engine)")


# the flag of each argparse dest that can end up in a refusal
FLAGS = {"model": "--model", "cluster": "--cluster", "nodes": "--nodes",
         "global_batch": "--global-batch", "seq_len": "--seq-len", "precision": "--precision",
         "engine": "--engine", "attention": "--attention", "dp": "--dp", "tp": "--tp",
         "pp": "--pp", "micro_batch": "--micro-batch", "sp": "--sp", "zero": "--zero",
         "schedule": "--schedule", "virtual_stages": "--virtual-stages",
         "recompute": "--recompute", "recompute_every": "--recompute-every",
         "mesh_order": "--mesh-order", "gpus": "--gpus", "compile": "--compile",
         "cp": "--cp", "cp_comm": "--cp-comm",
         "fp8_recipe": "--fp8-recipe", "ep": "--ep", "etp": "--etp",
         "moe_imbalance": "--moe-imbalance",
         "task": "--task", "lora_rank": "--lora-rank", "lora_targets": "--lora-targets",
         "dp_shard": "--dp-shard", "offload": "--offload"}
# planner.rules key -> the flags (dests) whose values that rule read
RULE_FLAGS = {"world": ("dp", "tp", "pp", "cp", "gpus"), "cp_seq": ("cp", "seq_len"),
              "cp_comm_off": ("cp_comm", "cp"), "cp_a2a_heads": ("cp_comm", "cp", "tp"),
              "cp_engine": ("cp", "engine"), "cp_flavour": ("cp_comm", "engine"),
              "cp_moe": ("cp",), "tp_heads": ("tp",), "tp_ffn": ("tp",),
              "tp_node": ("tp",), "sp_tp": ("sp", "tp"), "sp_seq": ("tp", "seq_len", "cp"),
              "zero_dp": ("zero", "dp", "cp"),
              "global_batch": ("global_batch", "dp", "micro_batch"),
              "precision": ("precision",), "positions": ("seq_len",),
              "fp8_engine": ("precision", "fp8_recipe", "engine"),
              "fp8_tp": ("precision", "tp", "engine"),
              "interleave_pp": ("schedule", "pp"), "zbv_v": ("schedule", "virtual_stages"),
              "interleave_v": ("schedule", "virtual_stages"),
              "single_v": ("schedule", "virtual_stages"),
              "interleave_m": ("schedule", "pp", "micro_batch"),
              "chunks": ("pp", "virtual_stages"), "zb_ddp": ("schedule", "zero", "dp"),
              "ddp_microbatches": ("zero", "pp", "micro_batch"),
              "ddp_gpipe": ("schedule", "zero"),
              "ddp_chunks": ("schedule", "zero", "virtual_stages", "micro_batch"),
              "1f1b_microbatches": ("schedule", "pp", "micro_batch"),
              "compile_engine": ("compile", "engine"), "compile_tp": ("compile", "tp"),
              "recompute_every_none": ("recompute_every", "recompute"),
              "recompute_every_layers": ("recompute_every", "model"),
              "recompute_engine": ("recompute", "engine"),
              "recompute_every_engine": ("recompute_every", "engine"),
              "lora_targets": ("lora_targets", "model"), "lora_engine": ("lora_rank", "engine"),
              "lora_tp": ("lora_rank", "tp"), "lora_recompute_op": ("lora_rank", "recompute"),
              "lora_compile": ("lora_rank", "compile"), "classify_tp": ("task", "tp"),
              "runtime_model": ("model", "engine"), "ep_dense": ("ep", "etp", "model"),
              "ep_experts": ("ep", "model"), "etp_ffn": ("etp", "model"),
              "ep_group": ("ep", "etp", "tp", "dp"), "ep_engine": ("ep", "engine"),
              "etp_engine": ("etp", "engine"), "ep_dp": ("ep", "dp", "engine"),
              "ep_sp": ("ep", "tp", "sp", "engine"),
              "dp_shard_divides": ("dp_shard", "dp"), "dp_shard_one": ("dp_shard",),
              "dp_shard_zero": ("dp_shard", "zero"),
              "dp_shard_engine": ("dp_shard", "zero", "engine"),
              "offload_engine": ("offload", "zero", "engine"),
              "offload_host": ("offload", "cluster")}


def is_default(args, dest: str) -> bool:
    """True when `dest` holds its default (planner.cli.main records what the command line set,
    as `args.given`; without that record nothing counts as a default)."""
    given = getattr(args, "given", None)
    return given is not None and dest not in given


def flag_values(args, dests) -> str:
    """'--dp 1 (default), --tp 2': the flags behind a refusal and where each value came from."""
    shown = []
    for dest in dests:
        value = getattr(args, dest, None)
        if value is None or value is False or (dest == "gpus" and not value):
            continue  # --gpus 0 means all GPUs: no value to show
        if dest in ("cp", "cp_comm") and is_default(args, dest):
            continue  # no context parallelism asked for: nothing to name
        text = FLAGS[dest] if value is True else f"{FLAGS[dest]} {value}"
        shown.append(text + (" (default)" if is_default(args, dest) else ""))
    return ", ".join(shown)


def check_precision(args, profile) -> None:
    """A precision the profile's GPU lacks (bf16 on a V100), refused naming the flag, whether
    the value was the default, and what to use instead."""
    if profile.supports(args.precision):
        return
    have = sorted(profile.gpu.peak_flops)
    use = next((p for p in PRECISIONS if p in have), None)
    where = (f"precision {args.precision} (the default of --precision)"
             if is_default(args, "precision") else f"--precision {args.precision}")
    hint = f"; use --precision {use}" if use else ""
    why = " has no FP8 tensor cores (Hopper/Ada or later have them); it" \
        if args.precision == "fp8" else ""
    raise ValueError(f"{where} is not supported by profile {profile.name} ({profile.gpu.name}"
                     f"{why} supports {', '.join(have)}){hint}")


def fp8_recipe(args) -> str:
    """--fp8-recipe under --precision fp8 (unset: the engine's default recipe); refused with
    any other precision."""
    recipe = getattr(args, "fp8_recipe", None)
    if args.precision != "fp8":
        if recipe is not None:
            raise ValueError(f"--fp8-recipe {recipe} needs --precision fp8, got --precision "
                             f"{args.precision}")
        return "none"
    if recipe is not None:
        return recipe
    return (engine(args.engine).fp8_recipes or FP8_RECIPES)[0]


def build_inputs(args) -> tuple:
    """(ModelSpec, Cluster, Job) from the shared flags."""
    model = load_model(args.model)
    cluster = load_cluster(args.cluster, args.nodes)
    gpus = getattr(args, "gpus", 0)
    try:
        cluster = with_gpus(cluster, gpus)
    except ValueError as exc:
        raise ValueError(f"{exc}; from --gpus {gpus}, {flag_values(args, ('nodes',))}") from None
    check_precision(args, cluster.profile)
    job = Job(global_batch=args.global_batch, seq_len=args.seq_len, precision=args.precision,
              attention=args.attention, engine=args.engine, fp8_recipe=fp8_recipe(args),
              task=getattr(args, "task", "pretrain"), num_labels=getattr(args, "num_labels", 2),
              lora=lora_from_args(args),
              moe_imbalance=getattr(args, "moe_imbalance", DEFAULT_MOE_IMBALANCE))
    return model, cluster, job


def build_plan(args) -> Plan:
    """A validated Plan from --plan or from the model/cluster/job/layout flags; a layout the
    rules refuse names the flags (and defaults) behind it."""
    from planner.plan import Layout, Plan
    if args.plan:
        if getattr(args, "gpus", 0):
            raise ValueError(f"--gpus {args.gpus} cannot change a --plan: the plan's cluster "
                             f"fixes its GPUs (plan with --model/--cluster/--gpus instead)")
        return Plan.load(args.plan)
    missing = [f for f in ("model", "cluster", "global_batch", "seq_len")
               if getattr(args, f) is None]
    if missing:
        raise ValueError(f"--{missing[0].replace('_', '-')} is required (or give --plan)")
    model, cluster, job = build_inputs(args)
    per_replica = args.global_batch // max(1, args.dp)
    if args.global_batch % max(1, args.dp) or per_replica % max(1, args.micro_batch):
        raise ValueError(f"global batch {args.global_batch} is not divisible by dp {args.dp} x "
                         f"micro batch {args.micro_batch} "
                         f"({flag_values(args, ('global_batch', 'dp', 'micro_batch'))})")
    layout = Layout(dp=args.dp, tp=args.tp, pp=args.pp, sequence_parallel=args.sp,
                    zero_stage=args.zero, micro_batch=args.micro_batch,
                    num_microbatches=per_replica // args.micro_batch, schedule=args.schedule,
                    virtual_stages=args.virtual_stages, recompute=args.recompute,
                    recompute_every=args.recompute_every,
                    mesh_order=tuple(a.strip() for a in args.mesh_order.split(",")),
                    compile=args.compile, cp=args.cp, cp_comm=args.cp_comm, ep=args.ep,
                    etp=args.etp, dp_shard=args.dp_shard, offload=args.offload)
    try:
        return Plan(model=model, cluster=cluster, job=job, layout=layout)
    except ValueError as exc:
        dests = RULE_FLAGS.get(_first_broken_rule(model, cluster, job, layout), ())
        note = flag_values(args, dests)
        if not note:
            raise
        raise ValueError(f"{exc}; from {note}") from None


def _first_broken_rule(model, cluster, job, layout):
    """The key of the first rule (planner.rules, in message order) the layout breaks."""
    from planner import rules
    ctx = rules.Context(model=model, profile=cluster.profile, job=job)
    cols = rules.layout_columns(layout, cluster.world_size)
    return next((r.key for r in rules.RULES if bool(r.broken(ctx, cols)[0])), None)


def bounded_int(lo: int, hi: int):
    """argparse type: a decimal integer in [lo, hi] (planner/limits.py), so that 0, -1, 1e309
    or 10^9 nodes are usage errors before anything runs."""
    def integer(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo:,}, {hi:,}], got "
                                             f"{_shown(text)}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo:,}, {hi:,}], got {_shown(text)}")
        return value
    return integer


def bounded_float(lo: float, hi: float, hi_open: bool = False):
    """argparse type: a finite number in [lo, hi] ([lo, hi) with hi_open); no nan or inf."""
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not lo <= value <= hi or (hi_open and value == hi):
            raise argparse.ArgumentTypeError(f"expected a finite number in [{lo:g}, {hi:g}"
                                             f"{')' if hi_open else ']'}, got {_shown(text)}")
        return value
    return number


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


def check_output(path: str, flag: str = "--out") -> None:
    """Refuse, before any work is done, an output path that cannot become a regular file: a
    missing or unwritable directory, a directory, a FIFO or a device (/dev/full), a name the file
    system refuses."""
    shown = show_path(path)
    if not path:
        raise ValueError(f"{flag}: empty path")
    try:
        real = os.path.realpath(path)
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    except (OSError, ValueError) as exc:  # too long, a loop of links, a NUL byte
        raise ValueError(f"{flag} {shown}: {getattr(exc, 'strerror', None) or exc}") from None
    if real.startswith(("/proc/", "/sys/", "/dev/")):  # devices and kernel files: never output
        raise ValueError(f"{flag} {shown} is not a regular file")
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise ValueError(f"{flag} {shown} is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{flag} {shown} is not a regular file")
        if not os.access(path, os.W_OK):
            raise ValueError(f"{flag} {shown} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {shown}: directory {show_path(parent)} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {shown}: directory {show_path(parent)} is not writable")
    if len(os.path.basename(path).encode(errors="surrogateescape")) > 255:
        raise ValueError(f"{flag} {shown}: File name too long")


def write_output(path: str, data, flag: str = "--out") -> None:
    """Write text or bytes to `path` through a temporary file in its directory and a rename: a
    full disk or a failed write leaves the old file (or none), never half a file."""
    import tempfile  # only when writing
    target = os.path.realpath(path)
    fd, tmp = None, None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target),
                                   prefix=f".{os.path.basename(target)[:200]}.")
        with os.fdopen(fd, "wb") as f:
            fd = None
            f.write(data.encode() if isinstance(data, str) else data)
        mode = (os.stat(target).st_mode if os.path.exists(target)
                else 0o666 & ~_umask())
        os.chmod(tmp, stat.S_IMODE(mode))
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise ValueError(f"cannot write {flag} {show_path(path)}: "
                         f"{exc.strerror or exc}") from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def strict_json(obj) -> str:
    """`obj` as strict JSON text (indent 1, final newline); a NaN or infinity anywhere is a
    ValueError naming where, never an `Infinity` token that JSON parsers refuse."""
    try:
        return json.dumps(obj, indent=1, allow_nan=False) + "\n"
    except ValueError:
        where, value = _first_non_finite(obj)
        raise ValueError(f"the result holds a non-finite number ({value}) at {where}; "
                         f"refusing to write invalid JSON") from None


def _first_non_finite(obj) -> tuple:
    stack = [("$", obj)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            return where, node
        if isinstance(node, dict):
            stack.extend((f"{where}.{k}", v) for k, v in reversed(list(node.items())))
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(node))))
    return "$", "?"


def save_plan(plan: Plan, path: str, flag: str = "--out") -> None:
    """The file Plan.save writes (indent 1, final newline), as strict JSON, atomically."""
    write_output(path, strict_json(plan.to_dict()), flag)


def print_json(obj) -> None:
    """Strict JSON on standard output (no NaN/Infinity tokens: a ValueError instead)."""
    sys.stdout.write(strict_json(obj))


# optional dependencies (pyproject.toml extras): the module a command needs -> its extra
EXTRAS = {"torch": "runtime", "streamlit": "ui"}


def require_module(module: str, what: str) -> None:
    """A one-line ValueError naming the extra to install when `module` is not importable here
    (looked up, not imported: the planner itself never imports torch or streamlit)."""
    import importlib.util
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked or broken installation
        found = False
    if not found:
        raise ValueError(f'{what} needs {module}: pip install "parallel-planner[{EXTRAS[module]}]"')
