"""Plan -> what other launchers and engines read: torchrun command lines for this project's
runtime (one per node), a Slurm sbatch script, a DeepSpeed config and a bash file of Megatron-LM
environment and arguments.

Each exporter refuses, with one line naming the value, a plan its engine cannot express, rather
than silently running something else; settings no plan holds (learning rate, iterations, data,
tokenizer) are written as marked placeholders, never left out.  tests/test_export_consumers.py
has torchrun, DeepSpeed and Megatron Core read the exports."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import operator
import re
import shlex
from typing import TYPE_CHECKING

from planner.engines import engine
from planner.schema import read_input_file

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


# a hostfile lists nodes: a line each, so a megabyte is 10^4 to 10^5 nodes (limits.MAX_NODES)
HOSTFILE_MAX_BYTES = 2**20


def _hostfile_text(path: str) -> str:
    """The hostfile's text: a regular file of at most HOSTFILE_MAX_BYTES, read without ever
    blocking (a FIFO or a device is refused: planner.schema.read_input_file)."""
    data = read_input_file(path, "hostfile", HOSTFILE_MAX_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"hostfile {path} is not UTF-8 text") from None


def read_hostfile(path: str) -> list:
    """Host names, one per line (DeepSpeed/MPI style 'host slots=8' accepted; '#' comments).
    A line whose host is not a host name or IP address, or whose other words are not
    'key=value' settings, is refused with its line number."""
    hosts = []
    for number, line in enumerate(_hostfile_text(path).splitlines(), 1):
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


_RDZV_ID = re.compile(rf"[A-Za-z0-9][{NAME_CHARS}]*")  # an argument value: no leading '-'


def _check_rdzv_id(rdzv_id) -> str:
    if isinstance(rdzv_id, str) and len(rdzv_id) > JOB_NAME_MAX:
        raise ValueError(f"rendezvous id {rdzv_id!r} is longer than {JOB_NAME_MAX} characters")
    return _check(rdzv_id, _RDZV_ID, "rendezvous id",
                  f"a letter or digit, then only the characters {NAME_CHARS}")


def _check_cpus(cpus) -> int:
    n = _integer(cpus)
    if n is None or n < 1:
        raise ValueError(f"cpus per task {cpus!r} must be an integer >= 1")
    return n


def torchrun_lines(plan: Plan, *, plan_path: str = "plan.json", steps: int = DEFAULT_STEPS,
                   hosts: list | None = None, master_addr: str | None = None,
                   master_port: int = DEFAULT_PORT, rdzv_id: str | None = None) -> list:
    """One torchrun command per node (a single line for a one-node plan).  Every value is
    quoted for the shell; host names must be host names or IP addresses.

    One node: `--standalone` (torchrun's own rendezvous on a free local port, so two runs on
    one host do not collide).  Several nodes: c10d rendezvous at the master's port with one
    `--rdzv-id` for the job (default: default_job_name(plan)); c10d assigns the node ranks
    itself, so every node runs the same line and there is no `--node-rank`."""
    from planner.runtime_support import runtime_gaps
    gaps = runtime_gaps(plan.model)
    if gaps:
        _refuse("torchrun", f"it runs runtime.train, whose model cannot build "
                f"{plan.model.name}: {'; '.join(gaps)}")
    if plan.job.engine != "torch":  # runtime.train is the torch engine: its rules apply
        from planner.plan import layout_errors
        errors = layout_errors(plan.model, plan.cluster,
                               dataclasses.replace(plan.job, engine="torch"), plan.layout)
        if errors:
            _refuse("torchrun", f"it runs runtime.train (the torch engine), which refuses "
                    f"this {plan.job.engine} plan: {errors[0]}")
    nodes, procs = _nodes_and_procs(plan)
    train = ["-m", "runtime.train", "--plan", _check_path(plan_path),
             "--steps", str(_check_steps(steps))]
    master_port = _check_port(master_port)
    hosts = None if hosts is None else [check_host(h) for h in hosts]
    master_addr = None if master_addr is None else check_host(master_addr)
    rdzv_id = default_job_name(plan) if rdzv_id is None else _check_rdzv_id(rdzv_id)
    if nodes == 1:
        return [_join(["torchrun", "--standalone", "--nproc-per-node", str(procs)] + train)]
    if hosts is not None and len(hosts) < nodes:
        raise ValueError(f"plan needs {nodes} nodes; the hostfile lists {len(hosts)}")
    host = master_addr or (hosts[0] if hosts else None)
    endpoint = (_Shell(f'"$MASTER_ADDR":{master_port}') if host is None
                else _endpoint(host, master_port))
    cmd = ["torchrun", "--nproc-per-node", str(procs), "--nnodes", str(nodes),
           "--rdzv-id", rdzv_id, "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
    lines = []
    for rank in range(nodes):
        where = f"# on {hosts[rank]}" if hosts else f"# on node {rank}"
        lines.append(f"{where}\n{_join(cmd + train)}")
    return lines


def torchrun(plan: Plan, **kwargs) -> str:
    return "\n".join(torchrun_lines(plan, **kwargs)) + "\n"


def slurm(plan: Plan, *, plan_path: str = "plan.json", steps: int = DEFAULT_STEPS,
          job_name: str | None = None, time_limit: str = "24:00:00", partition: str | None = None,
          master_port: int = DEFAULT_PORT, cpus_per_task: int | None = None) -> str:
    """An sbatch script: one task per node, each starting torchrun with c10d rendezvous.

    The #SBATCH values (job name, partition, time) must match NAME_CHARS / Slurm's time
    formats; the default job name is default_job_name(plan).  srun gives a task one CPU unless
    told otherwise, and each task here runs all of a node's ranks: it gets `cpus_per_task` CPUs
    (also an #SBATCH line), by default every CPU of the exclusively held node
    ($SLURM_CPUS_ON_NODE).  The rendezvous port is `master_port` unless $MASTER_PORT is set
    when the job starts; the rendezvous id is the job id, and c10d assigns the node ranks.
    Every value is a quoted argument of srun; the script splices none into code."""
    nodes, procs = _nodes_and_procs(plan)
    name = default_job_name(plan) if job_name is None else check_job_name(job_name)
    head = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --nodes={nodes}",
            "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={procs}",
            f"#SBATCH --time={check_time(time_limit)}", "#SBATCH --exclusive"]
    if partition is not None:
        head.append(f"#SBATCH --partition={check_partition(partition)}")
    if cpus_per_task is None:
        cpus: str = _Shell('--cpus-per-task="$SLURM_CPUS_ON_NODE"')
    else:
        cpus = f"--cpus-per-task={_check_cpus(cpus_per_task)}"
        head.append(f"#SBATCH {cpus}")
    torch_args = ["torchrun", "--nproc-per-node", str(procs), "--nnodes", str(nodes),
                  "--rdzv-id", _Shell('"$SLURM_JOB_ID"'), "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", _Shell('"$MASTER_ADDR:$MASTER_PORT"'), "-m", "runtime.train",
                  "--plan", _check_path(plan_path), "--steps", str(_check_steps(steps))]
    body = ["set -euo pipefail",
            # sed reads the whole list: `head -n 1` can end scontrol with SIGPIPE, which
            # pipefail turns into a failed job
            'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
            f"MASTER_PORT=${{MASTER_PORT:-{_check_port(master_port)}}}",
            "export MASTER_ADDR MASTER_PORT",
            "srun " + _join(["--kill-on-bad-exit=1", cpus])
            + " \\\n    " + _join(torch_args)]
    return "\n".join(head + [""] + body) + "\n"


def _refuse(engine: str, what: str) -> None:
    flag = {"Megatron-LM": "megatron", "DeepSpeed": "deepspeed"}.get(engine)
    hint = (f"; plan for it with `planner suggest ... --engine {flag}`, which searches only "
            f"what {engine} runs" if flag else "")
    raise ValueError(f"{engine} cannot express this plan: {what}{hint}")


def _refuse_compile(engine: str, lay) -> None:
    """The estimate of a compile plan is of this runtime's torch.compile'd blocks."""
    if lay.compile:
        raise ValueError(f"{engine} cannot express this plan: compile (torch.compile of each "
                         f"block, as this project's runtime runs it); export the plan to "
                         f"torchrun or slurm, or re-plan without --compile")


# AdamW as runtime/optim.py runs it; the learning rate is the one setting no plan holds.
ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8
ADAMW_WEIGHT_DECAY = 0.1
LR_PLACEHOLDER = 3e-4  # a number DeepSpeed accepts; the config's "placeholders" key names it


def deepspeed_config(plan: Plan) -> dict:
    """DeepSpeed JSON config (checked against DeepSpeed 0.19.8 by tests/test_export_consumers.py).

    What the config cannot say (where the tensor and pipeline degrees come from, what the model
    code must do) is in the 'comment' key, which DeepSpeed ignores; settings no plan holds are
    listed in the 'placeholders' key by their dotted path."""
    from planner.engines import DEEPSPEED
    lay, job = plan.layout, plan.job
    _refuse_compile("DeepSpeed", lay)
    if lay.ep > 1 or lay.etp > 1:
        _refuse("DeepSpeed", f"ep={lay.ep} etp={lay.etp}; DeepSpeed's expert parallelism "
                "needs deepspeed.moe.layer.MoE modules in the model, which its config does not "
                "set up")
    if job.fp8:
        raise ValueError(f"DeepSpeed cannot express this plan: precision fp8 "
                         f"({job.fp8_recipe}): {engine('deepspeed').fp8_refusal}")
    if lay.pp > 1 and lay.schedule != "1f1b":
        _refuse("DeepSpeed", f"schedule {lay.schedule}; its pipeline engine runs 1F1B only")
    if lay.pp > 1 and lay.zero_stage >= 2:
        _refuse("DeepSpeed", f"ZeRO-{lay.zero_stage} with pp={lay.pp}; pipeline parallelism "
                "supports ZeRO stages 0 and 1 only")
    if lay.cp > 1:
        _refuse("DeepSpeed", f"context parallelism cp={lay.cp}: "
                f"{engine('deepspeed').cp_refusal}")
    if lay.hybrid:
        _refuse("DeepSpeed", f"hybrid sharding (dp_shard={lay.dp_shard} of dp={lay.dp}): "
                f"{DEEPSPEED.hsdp_note}")
    cfg: dict = {"train_batch_size": job.global_batch,
           "train_micro_batch_size_per_gpu": lay.micro_batch,
           "gradient_accumulation_steps": lay.num_microbatches,
           "gradient_clipping": CLIP_NORM,
           "optimizer": {"type": "AdamW",
                         "params": {"lr": LR_PLACEHOLDER, "betas": list(ADAMW_BETAS),
                                    "eps": ADAMW_EPS, "weight_decay": ADAMW_WEIGHT_DECAY}},
           "zero_optimization": {"stage": lay.zero_stage},
           "bf16": {"enabled": job.precision == "bf16"},
           "fp16": {"enabled": job.precision == "fp16"},
           "steps_per_print": 10}
    _deepspeed_offload(cfg, lay)
    if job.engine == "deepspeed":
        _deepspeed_engine_settings(cfg, lay, job)
    elif lay.zero_stage >= 2:
        cfg["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)
    if job.precision == "bf16" and job.engine != "deepspeed":
        # the plan counts fp32 gradient reduction (and accumulation); DeepSpeed's bf16 default
        # is bf16 for both.  Without ZeRO it refuses fp32 accumulation ("unsupported mix")
        cfg["communication_data_type"] = "fp32"
        if lay.zero_stage >= 1:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if _autotp(lay):
        cfg["tensor_parallel"] = {"autotp_size": lay.tp}
    if lay.recompute == "full":
        cfg["activation_checkpointing"] = {"partition_activations": lay.sequence_parallel,
                                           "contiguous_memory_optimization": False}
        # the pipeline engine checkpoints only at this interval (0: never); an interval K
        # checkpoints groups of K blocks, not every K-th block, so recompute_every > 1 is
        # left to the model code (_deepspeed_note)
        if lay.pp > 1 and lay.recompute_every == 1:
            cfg["pipeline"] = {"activation_checkpoint_interval": 1}
    cfg["placeholders"] = {"optimizer.params.lr": f"{LR_PLACEHOLDER:g} stands in for the peak "
                           "learning rate: the plan does not choose one"}
    cfg["comment"] = _deepspeed_note(lay, job)
    return cfg


def _deepspeed_offload(cfg: dict, lay) -> None:
    """CPU offload: offload_optimizer (ZeRO-Offload; DeepSpeed then steps with its CPU-Adam) and
    for `params` also offload_param, which DeepSpeed runs at ZeRO-3 only
    (deepspeed/runtime/zero/offload_config.py)."""
    if lay.offload == "none":
        return
    if lay.zero_stage == 0:
        _refuse("DeepSpeed", f"offload {lay.offload} with ZeRO-0; offload_optimizer needs ZeRO "
                "1 to 3")
    if lay.offload == "params" and lay.zero_stage != 3:
        _refuse("DeepSpeed", f"offload params with ZeRO-{lay.zero_stage}; offload_param runs at "
                "ZeRO-3 only")
    zero = cfg["zero_optimization"]
    zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if lay.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}


def _deepspeed_engine_settings(cfg: dict, lay, job) -> None:
    """What a `--engine deepspeed` plan assumed (planner/cost/deepspeed.py): gradients
    accumulated and reduced in the model dtype, contiguous gradients with overlap_comm, and its
    bucket sizes, written out rather than left to DeepSpeed's defaults."""
    from planner.cost import deepspeed as ds  # the light commands never load the cost model
    cfg["communication_data_type"] = job.precision
    cfg["data_types"] = {"grad_accum_dtype": job.precision}
    if lay.zero_stage == 0:
        return
    zero = cfg["zero_optimization"]
    zero.update(overlap_comm=True, contiguous_gradients=True,
                reduce_bucket_size=ds.REDUCE_BUCKET_SIZE)
    if lay.zero_stage < 3:
        zero["allgather_bucket_size"] = ds.ALLGATHER_BUCKET_SIZE
    else:
        zero.update(stage3_prefetch_bucket_size=ds.PREFETCH_BUCKET_SIZE,
                    stage3_max_live_parameters=ds.MAX_LIVE_PARAMETERS)


def _autotp(lay) -> bool:
    """DeepSpeed's AutoTP runs the tensor parallelism: tp > 1 without a pipeline (its groups
    replace the PipelineModule's) and without sequence parallelism (AutoTP has none)."""
    return lay.tp > 1 and lay.pp == 1 and not lay.sequence_parallel


def _deepspeed_note(lay, job) -> str:
    notes = [(f"data parallel {lay.dp}: DeepSpeed derives it from the world size and the "
              "model's parallel groups")]
    if _autotp(lay):
        notes.append(
            f"tensor parallel {lay.tp}: DeepSpeed AutoTP (tensor_parallel.autotp_size) shards a "
            "Hugging Face-style model; its batch check counts every rank unless an mpu says "
            "otherwise, so after deepspeed.init_distributed() call "
            f"deepspeed.utils.groups._init_tp_mesh_device(tensor_model_parallel_size={lay.tp}) "
            "and pass mpu=deepspeed.utils.groups to deepspeed.initialize")
    elif lay.tp > 1:
        sp = " + sequence parallel" if lay.sequence_parallel else ""
        why = "a pipeline" if lay.pp > 1 else "sequence parallelism (AutoTP has none)"
        notes.append(f"tensor parallel {lay.tp}{sp} is not a DeepSpeed config key, and this "
                     f"export uses AutoTP only without {why}: Megatron-DeepSpeed sets it "
                     f"(--tensor-model-parallel-size {lay.tp}"
                     f"{' --sequence-parallel' if lay.sequence_parallel else ''}) and passes "
                     "its mpu, which DeepSpeed's batch check needs")
    if lay.pp > 1:
        topo = (f"topology=PipeModelDataParallelTopology(num_pp={lay.pp}, num_mp={lay.tp}, "
                f"num_dp={lay.dp})" if lay.tp > 1 else f"num_stages={lay.pp}")
        notes.append(f"pipeline parallel {lay.pp} is not a config key: build a "
                     f"deepspeed.pipe.PipelineModule({topo}); its mpu gives DeepSpeed's batch "
                     f"check the data-parallel size")
        if job.precision == "bf16" and job.engine == "deepspeed" and lay.zero_stage == 0:
            notes.append("bf16 with a pipeline and no ZeRO runs DeepSpeed's BF16_Optimizer "
                         "(bf16 gradient accumulation): it shards the fp32 master weights and "
                         "optimizer states over the data-parallel ranks like ZeRO-1, as planned")
        elif job.precision == "bf16" and job.engine != "deepspeed":
            shard = ("as planned" if lay.zero_stage == 1 else
                     "which the plan does not count (it uses less memory than planned)")
            notes.append("bf16 with a pipeline runs DeepSpeed's BF16_Optimizer: it shards the "
                         "fp32 master weights and optimizer states over the data-parallel ranks "
                         f"like ZeRO-1, {shard}")
    if job.engine == "deepspeed":
        notes.append(f"planned for DeepSpeed (--engine deepspeed): gradients accumulated and "
                     f"reduced in {job.precision}, as this config sets")
    elif job.precision == "bf16" and lay.zero_stage == 0:
        notes.append("bf16 without ZeRO: DeepSpeed accumulates gradients in bf16 (it refuses "
                     "data_types.grad_accum_dtype fp32 there) where the plan counts fp32; "
                     "they are reduced in fp32 (communication_data_type)")
    if job.precision == "fp16" and job.engine != "deepspeed":
        notes.append("fp16: DeepSpeed accumulates and reduces gradients in fp16 (its default)")
    if lay.recompute == "full" and lay.pp == 1:
        notes.append("full recompute: the model code must checkpoint each block "
                     "(deepspeed.checkpointing.checkpoint, configured by activation_checkpointing,"
                     " or the model's gradient_checkpointing_enable())")
    if lay.recompute == "selective":
        notes.append("selective recompute is not a DeepSpeed config key: checkpoint the "
                     "attention core in the model code")
    if lay.recompute == "op":
        notes.append("op-level recompute is not a DeepSpeed config key: checkpoint each block "
                     "in the model code with torch.utils.checkpoint and torchtitan's op policy "
                     "(create_selective_checkpoint_contexts; runtime/recompute.py)")
    if lay.recompute != "none" and lay.recompute_every > 1:
        notes.append(f"recompute_every {lay.recompute_every}: the model code must apply "
                     f"{lay.recompute} recompute to blocks {lay.recompute_every - 1}, "
                     f"{2 * lay.recompute_every - 1}, ... only (0-based; DeepSpeed's "
                     f"activation_checkpoint_interval checkpoints groups of blocks instead)")
    if job.lora is not None:
        notes.append(f"LoRA rank {job.lora.rank} on {','.join(job.lora.targets)} (alpha "
                     f"{job.lora.alpha:g}): not a DeepSpeed config key; the model code must wrap "
                     f"those projections with adapters (e.g. PEFT) and freeze the rest, and pass "
                     f"only the trainable parameters to deepspeed.initialize; the plan's memory "
                     f"is this project's runtime's (runtime/lora.py)")
    if job.task != "pretrain":
        notes.append(f"task {job.task}: the model code supplies the "
                     + ("classification head and pooling" if job.task == "classify"
                        else "prompt-masked labels (-100 on the prompt)"))
    notes.append(f"optimizer.params.lr {LR_PLACEHOLDER:g} is a placeholder: set the learning "
                 "rate")
    return "; ".join(notes)


def deepspeed(plan: Plan) -> str:
    return json.dumps(deepspeed_config(plan), indent=1) + "\n"


# Megatron-LM settings no plan holds: the export writes each as a required shell variable,
# ${NAME:?...}, which stops the shell with that message while it is unset.
MEGATRON_PLACEHOLDERS = {
    "--lr": ("LR", "the peak learning rate"),
    "--train-iters": ("TRAIN_ITERS", "the number of training iterations"),
    "--data-path": ("DATA_PATH", "the prefix of a Megatron-LM indexed dataset"),
    "--tokenizer-model": ("TOKENIZER_MODEL", "a Hugging Face tokenizer name or path"),
}
# planner ZeRO stage -> Megatron-FSDP's data-parallel sharding strategy
MEGATRON_FSDP_SHARDING = {2: "optim_grads", 3: "optim_grads_params"}
# planner attention kernel -> Megatron-LM --attention-backend (flash: FlashAttention; the
# others materialise the scores: TE's unfused attention, with or without the fused softmax)
MEGATRON_ATTENTION = {"flash": "flash", "fused": "unfused", "eager": "unfused"}


def megatron_env(plan: Plan) -> dict:
    """Environment Megatron-LM needs for this plan: its argument check refuses tensor
    parallelism unless CUDA_DEVICE_MAX_CONNECTIONS=1 (one CUDA stream queue keeps the TP
    communication in launch order, ahead of the compute it overlaps)."""
    return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if plan.layout.tp > 1 else {}


def _placeholder(flag: str, fill) -> str:
    name, what = MEGATRON_PLACEHOLDERS[flag]
    if fill is not None:
        return str(fill[name])
    return _Shell(f'"${{{name}:?set {name} to {what}}}"')


def megatron_args(plan: Plan, fill: dict | None = None) -> list:
    """Megatron-LM pretrain_gpt.py arguments (flat list of strings).  The settings of
    MEGATRON_PLACEHOLDERS are shell references `"${LR:?...}"`, or fill[NAME] where `fill`
    gives them values."""
    lay, job, spec = plan.layout, plan.job, plan.model
    _refuse_compile("Megatron-LM", lay)
    if plan.job.lora is not None:
        raise ValueError(f"Megatron-LM cannot express this plan: LoRA (rank "
                         f"{plan.job.lora.rank}); Megatron-LM's pretrain scripts have no adapter "
                         f"layers; export the plan to torchrun or slurm (runtime/lora.py)")
    if plan.job.task != "pretrain":
        raise ValueError(f"Megatron-LM cannot express this plan: task {plan.job.task}; its "
                         f"pretrain_gpt.py trains language models only; export to torchrun")
    if lay.schedule in ("gpipe", "interleaved_zb", "zbv") and lay.pp > 1:
        _refuse("Megatron-LM", f"schedule {lay.schedule}; it runs 1F1B and interleaved 1F1B")
    if spec.arch == "bert":
        _refuse("Megatron-LM", "arch bert with pretrain_gpt.py (use pretrain_bert.py)")
    args = ["--tensor-model-parallel-size", str(lay.tp),
            "--pipeline-model-parallel-size", str(lay.pp)]
    args += _pipeline_split_args(lay, spec)
    args += _context_parallel_args(lay)
    if lay.sequence_parallel:
        args.append("--sequence-parallel")
    if lay.recompute == "op":
        _refuse("Megatron-LM", "recompute op (torchtitan's op-level policy); it recomputes "
                "selective (--recompute-granularity selective) or full")
    if lay.recompute_every > 1:
        _refuse("Megatron-LM", f"recompute_every {lay.recompute_every} (every "
                f"{lay.recompute_every}-th block); its --recompute-method uniform/block "
                f"checkpoints groups of blocks or a stage's first blocks")
    if lay.recompute == "selective":
        args += ["--recompute-granularity", "selective"]
    elif lay.recompute == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1"]
    if lay.zero_stage >= 1:
        args.append("--use-distributed-optimizer")
    if lay.zero_stage >= 2:
        args += ["--use-megatron-fsdp", "--data-parallel-sharding-strategy",
                 MEGATRON_FSDP_SHARDING[lay.zero_stage]]
    if lay.offload == "params":
        _refuse("Megatron-LM", "offload params; it offloads the distributed optimizer only "
                "(--optimizer-cpu-offload)")
    if lay.offload == "optimizer":
        if lay.zero_stage == 0:
            _refuse("Megatron-LM", "offload optimizer with ZeRO-0; --optimizer-cpu-offload "
                    "needs the distributed optimizer (ZeRO-1)")
        args.append("--optimizer-cpu-offload")  # megatron-core optimizer_config.py
    if lay.hybrid:
        # dp / dp_shard instances of the distributed optimizer (Megatron-FSDP: HSDP, its outer
        # dp_replicate level unsharded), each over dp_shard consecutive dp ranks
        # (megatron/core/parallel_state.py intra-partial groups; mcore_fsdp_adapter enable_hsdp)
        args += ["--num-distributed-optimizer-instances", str(lay.dp_replicate)]
    args += ["--micro-batch-size", str(lay.micro_batch),
             "--global-batch-size", str(job.global_batch), "--seq-length", str(job.seq_len)]
    args += _model_args(spec, job)
    args += _attention_args(spec) + _moe_args(spec, lay)
    args += ["--lr", _placeholder("--lr", fill),
             "--train-iters", _placeholder("--train-iters", fill),
             "--data-path", _placeholder("--data-path", fill),
             "--tokenizer-type", "HuggingFaceTokenizer",
             "--tokenizer-model", _placeholder("--tokenizer-model", fill)]
    return args


# Megatron-LM's --cp-comm-type values (megatron/core/transformer/transformer_config.py
# cp_comm_type: "p2p" is the ring, "all_gather", "a2a"; Transformer Engine runs them)
MEGATRON_CP_COMM = {"allgather": "all_gather", "ring": "p2p", "a2a": "a2a"}


def _context_parallel_args(lay) -> list:
    """--context-parallel-size and --cp-comm-type; Megatron's rank order tp-cp-ep-dp-pp puts
    cp inside dp and outside tp, as the plan's default mesh order does."""
    if lay.cp == 1:
        return []
    return ["--context-parallel-size", str(lay.cp), "--cp-comm-type",
            MEGATRON_CP_COMM[lay.cp_comm]]


def _pipeline_split_args(lay, spec) -> list:
    """Layers per pipeline stage: Megatron-LM splits evenly over pp * virtual stages by
    itself; any other split (given layers_per_stage, or layers that do not divide) is written
    as --pipeline-model-parallel-layout, one '|'-separated stage per model chunk in pipeline
    order ('E' embedding, 't' a transformer layer, 'L' the output layer and loss)."""
    if lay.pp == 1:
        return []
    chunks = lay.stage_layers(spec.num_layers)
    if sum(chunks) != spec.num_layers or len(chunks) != lay.num_chunks:
        _refuse("Megatron-LM", f"layers_per_stage {list(chunks)} do not split "
                f"{spec.num_layers} layers into {lay.num_chunks} stages")
    if len(set(chunks)) == 1:
        if lay.virtual_stages == 1:
            return []
        return ["--num-layers-per-virtual-pipeline-stage", str(chunks[0])]
    stages = [f"t*{n}" if n else "" for n in chunks]
    stages[0] = "E" + stages[0]
    stages[-1] += "L"
    return ["--pipeline-model-parallel-layout", "|".join(stages)]


def _model_args(spec, job) -> list:
    args = ["--num-layers", str(spec.num_layers), "--hidden-size", str(spec.hidden_size),
            "--num-attention-heads", str(spec.num_heads),
            "--ffn-hidden-size", str(spec.ffn_hidden_size),
            "--max-position-embeddings", str(spec.max_seq_len),
            "--vocab-size", str(spec.vocab_size),
            "--attention-dropout", str(spec.dropout), "--hidden-dropout", str(spec.dropout)]
    if spec.arch == "llama":
        if not float(spec.rope_theta).is_integer():
            _refuse("Megatron-LM", f"rope_theta {spec.rope_theta}: --rotary-base takes an "
                    "integer")
        args += ["--position-embedding-type", "rope", "--rotary-base", str(int(spec.rope_theta)),
                 "--normalization", "RMSNorm", "--norm-epsilon", f"{spec.norm_eps:g}",
                 "--swiglu"]
        if spec.num_kv_heads != spec.num_heads:
            args += ["--group-query-attention", "--num-query-groups", str(spec.num_kv_heads)]
    if not spec.tie_embeddings:  # Megatron-LM ties them unless told
        args.append("--untie-embeddings-and-output-weights")
    if not spec.linear_bias:
        args.append("--disable-bias-linear")
    if job.dtype in ("bf16", "fp16"):
        args.append(f"--{job.dtype}")
    args += _fp8_args(job)
    args += ["--attention-backend", MEGATRON_ATTENTION[job.attention]]
    if job.attention == "eager":
        args.append("--no-masked-softmax-fusion")
    args += ["--clip-grad", str(CLIP_NORM)]
    return args


def _attention_args(spec) -> list:
    """Head width, q/k norms, q/k/v-only biases and multi-head latent attention
    (megatron/training/arguments.py; MLATransformerConfig)."""
    if spec.attention_sinks:
        _refuse("Megatron-LM", "attention_sinks (GPT-OSS's learned per-head sink logits): "
                "Megatron-LM's arguments have no flag for them")
    args = []
    if spec.attention_head_dim and spec.attention_head_dim * spec.num_heads != spec.hidden_size:
        args += ["--kv-channels", str(spec.attention_head_dim)]
    if spec.qk_norm:
        args.append("--qk-layernorm")
    if spec.qkv_bias:
        args.append("--add-qkv-bias")
    if spec.mla:
        m = spec.mla
        if not m.q_lora_rank:
            _refuse("Megatron-LM", "mla with q_lora_rank 0 (a full-rank query) needs "
                    "--q-lora-rank unset, which the export does not write")
        args += ["--multi-latent-attention", "--q-lora-rank", str(m.q_lora_rank),
                 "--kv-lora-rank", str(m.kv_lora_rank), "--qk-head-dim", str(m.qk_nope_head_dim),
                 "--qk-pos-emb-head-dim", str(m.qk_rope_head_dim),
                 "--v-head-dim", str(m.v_head_dim)]
    return args


def _moe_args(spec, lay) -> list:
    """Megatron-Core MoE (megatron/core/transformer/moe/): routed experts as a grouped GEMM,
    all-to-all token dispatch, top-k routing with the auxiliary load-balancing loss."""
    if spec.moe is None:
        return []
    moe = spec.moe
    layers = "[" + ",".join(str(int(moe.is_moe_layer(i))) for i in range(spec.num_layers)) + "]"
    args = ["--num-experts", str(moe.num_experts), "--moe-router-topk",
            str(moe.experts_per_token), "--moe-ffn-hidden-size", str(moe.expert_ffn_hidden_size),
            "--expert-model-parallel-size", str(lay.ep),
            "--expert-tensor-parallel-size", str(lay.etp), "--moe-grouped-gemm",
            "--moe-token-dispatcher-type", "alltoall",
            "--moe-router-score-function", moe.router, "--moe-layer-freq", layers]
    if moe.aux_loss_coef:
        args += ["--moe-router-load-balancing-type", "aux_loss",
                 "--moe-aux-loss-coeff", f"{moe.aux_loss_coef:g}"]
    else:
        args += ["--moe-router-load-balancing-type", "none"]
    if moe.shared_ffn_hidden_size:
        args += ["--moe-shared-expert-intermediate-size", str(moe.shared_ffn_hidden_size)]
    if moe.shared_expert_gate:
        args.append("--moe-shared-expert-gate")
    if moe.capacity_factor:
        args += ["--moe-expert-capacity-factor", f"{moe.capacity_factor:g}"]
    return args
# Transformer Engine FP8 under megatron-core 0.16 (transformer_config.py: fp8 -> --fp8-format,
# fp8_recipe, fp8_amax_history_len, fp8_amax_compute_algo): hybrid = E4M3 forward, E5M2
# gradients; delayed scaling with the 1024-step amax history and max algorithm of NVIDIA's
# Megatron-LM/NeMo FP8 recipes (megatron-core defaults are a 1-step history, most_recent)
FP8_MEGATRON = {"delayed": ["--fp8-format", "hybrid", "--fp8-recipe", "delayed",
                            "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max"],
                "tensorwise": ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]}


def _fp8_args(job) -> list:
    if not job.fp8:
        return []
    if job.fp8_recipe not in FP8_MEGATRON:
        _refuse("Megatron-LM", f"fp8_recipe {job.fp8_recipe}: Transformer Engine under "
                f"megatron-core 0.16 has delayed, tensorwise, mxfp8 and blockwise recipes, no "
                f"torchao-style rowwise scaling")
    return FP8_MEGATRON[job.fp8_recipe]


def megatron(plan: Plan) -> str:
    """A bash fragment: the environment Megatron-LM needs (megatron_env) and the arguments as
    the array MEGATRON_ARGS, one flag (and its value) per line, for
    `torchrun ... pretrain_gpt.py "${MEGATRON_ARGS[@]}"`.  Source it with the placeholder
    variables set."""
    lay = plan.layout
    head = ["#!/bin/bash",
            (f"# Megatron-LM pretrain_gpt.py for {default_job_name(plan)} "
             "(planner export --to megatron); source this file, then run"),
            '#   torchrun <one line per node> pretrain_gpt.py "${MEGATRON_ARGS[@]}"',
            "# Set first (the plan does not choose them; each is required):"]
    head += [f"#   {name:<16} {what} ({flag})"
             for flag, (name, what) in MEGATRON_PLACEHOLDERS.items()]
    env = megatron_env(plan)
    if env:
        head.append(f"# tp={lay.tp}: Megatron-LM refuses tensor parallelism without this")
    head += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    groups = []
    for a in megatron_args(plan):
        if a.startswith("--"):
            groups.append([a])
        else:
            groups[-1].append(a)
    body = ["# shellcheck disable=SC2034  # read where this file is sourced",
            "MEGATRON_ARGS=("] + [f"    {_join(g)}" for g in groups] + [")"]
    return "\n".join(head + body) + "\n"


FORMATS = {"torchrun": torchrun, "slurm": slurm, "deepspeed": deepspeed, "megatron": megatron}
FILE_NAMES = {"torchrun": "launch_torchrun.sh", "slurm": "job.slurm",
              "deepspeed": "ds_config.json", "megatron": "megatron_args.sh"}


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
