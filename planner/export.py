"""Plan -> what other launchers and engines read: torchrun command lines for this project's
runtime (one per node), a Slurm sbatch script, a DeepSpeed config and Megatron-LM arguments.

Each exporter refuses, with one line naming the value, a plan its engine cannot express, rather
than silently running something else."""

from __future__ import annotations

import ipaddress
import json
import operator
import re
import shlex
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: `planner --help` reads FORMATS without loading planner.plan
    from planner.plan import Plan

DEFAULT_PORT = 29500
DEFAULT_STEPS = 50
CLIP_NORM = 1.0  # gradient clipping the runtime applies (global L2 norm)

# Values written into scheduler directives (#SBATCH lines are read by sbatch, not by a shell, so
# they cannot be quoted) and host names must match these; anything else is refused.
NAME_CHARS = "A-Za-z0-9._-"
_NAME = re.compile(rf"[{NAME_CHARS}]+")
_PARTITION = re.compile(rf"[{NAME_CHARS}]+(,[{NAME_CHARS}]+)*")  # sbatch takes a list
# Slurm's --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or unlimited
_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|unlimited|INFINITE|infinite")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
JOB_NAME_MAX = 128


def _check(value, pattern, what: str, allowed: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not allowed: use {allowed}")
    return value


def check_job_name(name) -> str:
    if isinstance(name, str) and len(name) > JOB_NAME_MAX:
        raise ValueError(f"job name {name!r} is longer than {JOB_NAME_MAX} characters")
    return _check(name, _NAME, "job name", f"only the characters {NAME_CHARS}")


def check_partition(partition) -> str:
    return _check(partition, _PARTITION, "partition",
                  f"names of the characters {NAME_CHARS}, comma-separated")


def check_time(time_limit) -> str:
    return _check(time_limit, _TIME, "time limit",
                  "Slurm's M, M:S, H:M:S, D-H, D-H:M, D-H:M:S or UNLIMITED")


def check_host(host) -> str:
    """A host name or IPv4/IPv6 address (IPv6 returned without brackets); anything else,
    such as a shell expansion or a name starting with '-', is refused."""
    if isinstance(host, str) and _HOST.fullmatch(host):
        return host
    try:
        return str(ipaddress.IPv6Address(str(host).removeprefix("[").removesuffix("]")))
    except ValueError:
        raise ValueError(f"host {host!r} is not a host name or IP address (allowed: letters, "
                         f"digits and '.-_', or an IPv6 address)") from None


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _integer(value):
    """`value` as an int if it is an integer type (not bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_port(port) -> int:
    n = _integer(port)
    if n is None or not 0 < n < 65536:
        raise ValueError(f"port {port!r} is not a port number (1-65535)")
    return n


def _check_steps(steps) -> int:
    n = _integer(steps)
    if n is None or n < 1:
        raise ValueError(f"steps {steps!r} must be an integer >= 1")
    return n


def _check_path(path) -> str:
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError(f"plan path {path!r} must be a non-empty string without NUL")
    return path


def default_job_name(plan: Plan) -> str:
    """'<model>-dp<d>tp<t>pp<p>', every character of the model name outside NAME_CHARS
    replaced by '-' (a model name is free text; a job name goes into an #SBATCH line)."""
    lay = plan.layout
    model = re.sub(rf"[^{NAME_CHARS}]+", "-", plan.model.name).strip("-")[:64] or "plan"
    return f"{model}-dp{lay.dp}tp{lay.tp}pp{lay.pp}"


def _nodes_and_procs(plan: Plan) -> tuple:
    """(nodes, processes per node) the plan's world size occupies."""
    world, gpn = plan.cluster.world_size, plan.cluster.profile.gpus_per_node
    nodes = -(-world // gpn)
    if world % nodes:
        raise ValueError(f"plan uses {world} GPUs over {nodes} nodes; torchrun needs the same "
                         f"number of processes on every node")
    return nodes, world // nodes


_SETTING = re.compile(r"[A-Za-z_]+=[A-Za-z0-9_]+")  # 'slots=8' after the host


def read_hostfile(path: str) -> list:
    """Host names, one per line (DeepSpeed/MPI style 'host slots=8' accepted; '#' comments).
    A line whose host is not a host name or IP address, or whose other words are not
    'key=value' settings, is refused with its line number."""
    hosts = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            try:
                hosts.append(check_host(words[0]))
                for word in words[1:]:
                    if not _SETTING.fullmatch(word):
                        raise ValueError(f"{word!r} after host {words[0]!r} is not a "
                                         f"'key=value' setting such as slots=8")
            except ValueError as exc:
                raise ValueError(f"hostfile {path} line {number}: {exc}") from None
    if not hosts:
        raise ValueError(f"hostfile {path} lists no hosts")
    return hosts


class _Shell(str):
    """A shell word this module writes itself (a $VARIABLE reference): emitted as is, where
    every other value is quoted."""


def _join(args: list) -> str:
    return " ".join(a if isinstance(a, _Shell) else shlex.quote(a) for a in args)


def torchrun_lines(plan: Plan, *, plan_path: str = "plan.json", steps: int = DEFAULT_STEPS,
                   hosts: list = None, master_addr: str = None,
                   master_port: int = DEFAULT_PORT) -> list:
    """One torchrun command per node (a single line for a one-node plan).  Every value is
    quoted for the shell; host names must be host names or IP addresses."""
    nodes, procs = _nodes_and_procs(plan)
    train = ["-m", "runtime.train", "--plan", _check_path(plan_path),
             "--steps", str(_check_steps(steps))]
    master_port = _check_port(master_port)
    hosts = None if hosts is None else [check_host(h) for h in hosts]
    master_addr = None if master_addr is None else check_host(master_addr)
    if nodes == 1:
        return [_join(["torchrun", "--nproc-per-node", str(procs)] + train)]
    if hosts is not None and len(hosts) < nodes:
        raise ValueError(f"plan needs {nodes} nodes; the hostfile lists {len(hosts)}")
    host = master_addr or (hosts[0] if hosts else None)
    endpoint = (_Shell(f'"$MASTER_ADDR":{master_port}') if host is None
                else _endpoint(host, master_port))
    lines = []
    for rank in range(nodes):
        cmd = ["torchrun", "--nproc-per-node", str(procs), "--nnodes", str(nodes),
               "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
        where = f"# on {hosts[rank]}" if hosts else f"# on node {rank}"
        lines.append(f"{where}\n{_join(cmd + train)}")
    return lines


def torchrun(plan: Plan, **kwargs) -> str:
    return "\n".join(torchrun_lines(plan, **kwargs)) + "\n"


def slurm(plan: Plan, *, plan_path: str = "plan.json", steps: int = DEFAULT_STEPS,
          job_name: str = None, time_limit: str = "24:00:00", partition: str = None,
          master_port: int = DEFAULT_PORT) -> str:
    """An sbatch script: one task per node, each starting torchrun with c10d rendezvous.

    The #SBATCH values (job name, partition, time) must match NAME_CHARS / Slurm's time
    formats; the default job name is default_job_name(plan).  The per-node command is a fixed
    `bash -c` script (it only reads $SLURM_NODEID / $SLURM_JOB_ID on the node); every value is
    passed to it as a quoted argument, never spliced into its text."""
    nodes, procs = _nodes_and_procs(plan)
    name = default_job_name(plan) if job_name is None else check_job_name(job_name)
    head = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --nodes={nodes}",
            "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={procs}",
            f"#SBATCH --time={check_time(time_limit)}", "#SBATCH --exclusive"]
    if partition is not None:
        head.append(f"#SBATCH --partition={check_partition(partition)}")
    per_node = 'exec torchrun --node-rank "$SLURM_NODEID" --rdzv-id "$SLURM_JOB_ID" "$@"'
    torch_args = ["--nproc-per-node", str(procs), "--nnodes", str(nodes),
                  "--rdzv-backend", "c10d", "--rdzv-endpoint",
                  _Shell('"$MASTER_ADDR:$MASTER_PORT"'), "-m", "runtime.train",
                  "--plan", _check_path(plan_path), "--steps", str(_check_steps(steps))]
    body = ["set -euo pipefail",
            # sed reads the whole list: `head -n 1` can end scontrol with SIGPIPE, which
            # pipefail turns into a failed job
            'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
            f"MASTER_PORT={_check_port(master_port)}",
            "export MASTER_ADDR MASTER_PORT",
            "# each node's task expands its own $SLURM_NODEID inside the single quotes",
            "# shellcheck disable=SC2016",
            "srun --kill-on-bad-exit=1 " + _join(["bash", "-c", per_node, "torchrun"])
            + " \\\n    " + _join(torch_args)]
    return "\n".join(head + [""] + body) + "\n"


def _refuse(engine: str, what: str) -> None:
    raise ValueError(f"{engine} cannot express this plan: {what}")


def deepspeed_config(plan: Plan) -> dict:
    """DeepSpeed JSON config.  DeepSpeed's config has no tensor or pipeline degree (they come
    from the model code / Megatron-DeepSpeed arguments); the 'comment' key says so."""
    lay, job = plan.layout, plan.job
    if lay.pp > 1 and lay.schedule != "1f1b":
        _refuse("DeepSpeed", f"schedule {lay.schedule}; its pipeline engine runs 1F1B only")
    if lay.pp > 1 and lay.zero_stage >= 2:
        _refuse("DeepSpeed", f"ZeRO-{lay.zero_stage} with pp={lay.pp}; pipeline parallelism "
                "supports ZeRO stages 0 and 1 only")
    cfg = {"train_batch_size": job.global_batch,
           "train_micro_batch_size_per_gpu": lay.micro_batch,
           "gradient_accumulation_steps": lay.num_microbatches,
           "gradient_clipping": CLIP_NORM,
           "zero_optimization": {"stage": lay.zero_stage},
           "bf16": {"enabled": job.precision == "bf16"},
           "fp16": {"enabled": job.precision == "fp16"},
           "steps_per_print": 10}
    if lay.zero_stage >= 2:
        cfg["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)
    if lay.recompute == "full":
        cfg["activation_checkpointing"] = {"partition_activations": lay.sequence_parallel,
                                           "contiguous_memory_optimization": False}
    cfg["comment"] = _deepspeed_note(lay)
    return cfg


def _deepspeed_note(lay) -> str:
    notes = [f"data parallel {lay.dp}: DeepSpeed derives it from the world size and the model's "
             "parallel groups"]
    if lay.tp > 1:
        sp = " + sequence parallel" if lay.sequence_parallel else ""
        notes.append(f"tensor parallel {lay.tp}{sp} is not a DeepSpeed config key: set it in "
                     "Megatron-DeepSpeed "
                     f"(--tensor-model-parallel-size {lay.tp}) or the model code")
    if lay.pp > 1:
        notes.append(f"pipeline parallel {lay.pp} is not a config key: build a "
                     f"deepspeed.pipe.PipelineModule(num_stages={lay.pp})")
    if lay.recompute == "selective":
        notes.append("selective recompute is not a DeepSpeed config key: checkpoint the "
                     "attention core in the model code")
    return "; ".join(notes)


def deepspeed(plan: Plan) -> str:
    return json.dumps(deepspeed_config(plan), indent=1) + "\n"


def megatron_args(plan: Plan) -> list:
    """Megatron-LM pretrain_gpt.py arguments (flat list of strings)."""
    lay, job, spec = plan.layout, plan.job, plan.model
    if lay.schedule in ("gpipe", "interleaved_zb", "zbv") and lay.pp > 1:
        _refuse("Megatron-LM", f"schedule {lay.schedule}; it runs 1F1B and interleaved 1F1B")
    if lay.zero_stage >= 2:
        _refuse("Megatron-LM", f"ZeRO-{lay.zero_stage}; its distributed optimizer shards the "
                "optimizer states only (ZeRO-1)")
    if spec.arch == "bert":
        _refuse("Megatron-LM", "arch bert with pretrain_gpt.py (use pretrain_bert.py)")
    args = ["--tensor-model-parallel-size", str(lay.tp),
            "--pipeline-model-parallel-size", str(lay.pp)]
    if lay.pp > 1 and lay.virtual_stages > 1:
        chunks = lay.pp * lay.virtual_stages
        if spec.num_layers % chunks:
            _refuse("Megatron-LM", f"{spec.num_layers} layers over {chunks} virtual stages")
        args += ["--num-layers-per-virtual-pipeline-stage", str(spec.num_layers // chunks)]
    if lay.sequence_parallel:
        args.append("--sequence-parallel")
    if lay.recompute == "selective":
        args += ["--recompute-granularity", "selective"]
    elif lay.recompute == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1"]
    if lay.zero_stage == 1:
        args.append("--use-distributed-optimizer")
    args += ["--micro-batch-size", str(lay.micro_batch),
             "--global-batch-size", str(job.global_batch), "--seq-length", str(job.seq_len)]
    args += _model_args(spec, job)
    return args


def _model_args(spec, job) -> list:
    args = ["--num-layers", str(spec.num_layers), "--hidden-size", str(spec.hidden_size),
            "--num-attention-heads", str(spec.num_heads),
            "--ffn-hidden-size", str(spec.ffn_hidden_size),
            "--max-position-embeddings", str(spec.max_seq_len),
            "--vocab-size", str(spec.vocab_size),
            "--attention-dropout", str(spec.dropout), "--hidden-dropout", str(spec.dropout)]
    if spec.arch == "llama":
        args += ["--position-embedding-type", "rope", "--rotary-base", f"{spec.rope_theta:g}",
                 "--normalization", "RMSNorm", "--norm-epsilon", f"{spec.norm_eps:g}",
                 "--swiglu", "--untie-embeddings-and-output-weights"]
        if spec.num_kv_heads != spec.num_heads:
            args += ["--group-query-attention", "--num-query-groups", str(spec.num_kv_heads)]
    if not spec.linear_bias:
        args.append("--disable-bias-linear")
    if job.precision in ("bf16", "fp16"):
        args.append(f"--{job.precision}")
    if job.flash_attention:
        args.append("--use-flash-attn")
    args += ["--clip-grad", str(CLIP_NORM)]
    return args


def megatron(plan: Plan) -> str:
    """The argument list, one flag (and its value) per line, ready to paste after
    `torchrun ... pretrain_gpt.py \\`."""
    args, lines = megatron_args(plan), []
    for a in args:
        if a.startswith("--"):
            lines.append(a)
        else:
            lines[-1] += f" {shlex.quote(a)}"
    return " \\\n".join(lines) + "\n"


FORMATS = {"torchrun": torchrun, "slurm": slurm, "deepspeed": deepspeed, "megatron": megatron}
FILE_NAMES = {"torchrun": "launch_torchrun.sh", "slurm": "job.slurm",
              "deepspeed": "ds_config.json", "megatron": "megatron_args.txt"}


def export_all(plan: Plan) -> dict:
    """{file name: text} of every format this plan can be expressed in; a format that refuses
    the plan gives a file holding its one-line reason."""
    out = {}
    for name, fn in FORMATS.items():
        try:
            out[FILE_NAMES[name]] = fn(plan)
        except ValueError as exc:
            out[FILE_NAMES[name]] = f"# not exported: {exc}\n"
    return out
