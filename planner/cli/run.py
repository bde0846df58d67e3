"""`planner run plan.json`: train under the plan on this host, then print predicted vs measured.

The command is planner.export's torchrun line for the plan (the one `planner export --to
torchrun` prints), started as a subprocess through `python -m runtime.launch` in place of
`torchrun`: the same launch, but it exits with the failing rank's code (README, "Exit codes")
instead of torchrun's 1 and a traceback. Before anything starts, the plan is checked against
this host (GPUs or CPU processes, nodes, devices, cores, memory), so a plan for another machine
is one line instead of a run that hangs. The planner never imports the runtime (nor torch: the
GPUs are counted by torch in a subprocess)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from planner import export
from planner.cli.common import print_json, require_module
from planner.report import compare_text
from planner.schema import load_json_file

if TYPE_CHECKING:  # planner.plan loads numpy: imported in run()
    from planner.plan import Plan

LAUNCHER = (sys.executable, "-m", "runtime.launch")  # stands in for `torchrun`

# runtime.train's own flags as its parser defines them (runtime/train.py, build_parser), less
# those `planner run` sets itself (--plan, --steps, --out from --measured, --debug): (flag,
# type, default, help). A copy, because the planner never imports the runtime;
# tests/test_runtime_launch.py checks that it agrees with runtime.train's parser.
RUNTIME_FLAGS = (
    ("--data", str, None, ("text file, directory of text files, or .bin token ids "
                           "(uint16; *.uint32.bin: uint32) (default: this Python's "
                           "standard-library sources)")),
    ("--data-cap-mb", float, 8.0, "bytes of text to read (MiB)"),
    ("--checkpoint-dir", str, None, ("directory of the checkpoints (--checkpoint-every, "
                                     "--resume)")),
    ("--checkpoint-every", int, 0, "save every K steps (0: never)"),
    ("--resume", bool, False, "continue from the newest checkpoint"),
    ("--lr", float, 3e-3, "peak learning rate"),
    ("--warmup", int, 0, "warmup steps (0: a tenth of --steps)"),
    ("--grad-clip", float, 1.0, "global-norm clip (0: off)"),
    ("--seed", int, 0, "seed of the weights, the data order and dropout"),
    ("--compile", bool, False, "torch.compile each block: the plan's compile (refused if it is "
                               "off)"),
    ("--metrics", str, None, ("append one JSON line per step here (loss, lr, step time, "
                              "tokens/s, grad norm, memory; val_loss on evaluated steps)")),
    ("--eval-every", int, 0, "validation loss every K steps (0: only at the end)"),
    ("--tensorboard", str, None, ("also write TensorBoard events to this directory (needs the "
                                  "tensorboard package)")),
    ("--init-from", str, None, ("start from a Hugging Face checkpoint directory (config.json "
                                "and *.safetensors, sharded or not) of the plan's model")),
    ("--tokenizer", str, None, ("tokenise text data with this tokenizer.json (or a directory "
                                "holding one; needs the tokenizers package)")),
    ("--lora-merge-out", str, None, ("LoRA plans: at the end, fold the adapters into the base "
                                     "weights (W + alpha/r B A) and write DIR/merged.pt, a full "
                                     "state dict without adapters")),
    ("--timeout", float, 60.0, "collective timeout (s)"),
)

METAVARS = {"--data": "PATH", "--data-cap-mb": "MIB", "--checkpoint-dir": "DIR",
            "--checkpoint-every": "K", "--lr": "LR", "--warmup": "STEPS", "--grad-clip": "NORM",
            "--seed": "SEED", "--timeout": "SECONDS", "--metrics": "PATH", "--eval-every": "K",
            "--tensorboard": "DIR", "--init-from": "DIR", "--tokenizer": "PATH",
            "--lora-merge-out": "DIR"}

MAX_PROCS_PER_CORE = 8  # CPU ranks: the cpu profile runs 4 per core; past 8, gloo times out
PROBE_TIMEOUT_S = 300
# how torch sees this host's GPUs (the runtime's own test: runtime/mesh.py)
PROBE = ("import torch; print(torch.__version__); "
         "print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
STOP_GRACE_S = 60  # after a Ctrl-C: how long the ranks have to stop before the launcher is


def add_parser(sub):
    p = sub.add_parser("run", help="train for real under a plan on this host (torchrun)",
                       description="Train under plan.json on this host: the torchrun line of "
                                   "`planner export --to torchrun`, then predicted vs "
                                   "measured. The plan must be for this machine: for its "
                                   "GPUs, or for its CPU processes (--cluster cpu).")
    p.add_argument("plan", help="plan.json from planner suggest / estimate --out")
    p.add_argument("--steps", type=int, default=50, help="training steps")
    p.add_argument("--measured", default="measured.json",
                   help="where the run writes its measurements")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (the files written, step time, tokens/s, "
                        "predicted vs measured); the ranks' log goes to standard error")
    group = p.add_argument_group(
        "training flags (runtime.train's own; also accepted after --, which passes anything on)")
    for flag, kind, default, text in RUNTIME_FLAGS:
        dest = "train_" + flag[2:].replace("-", "_")
        if kind is bool:
            group.add_argument(flag, dest=dest, action="store_true", help=text)
        else:
            group.add_argument(flag, dest=dest, type=_text_of(kind), default=default, help=text,
                               metavar=METAVARS[flag])
    p.epilog = ("e.g. planner run plan.json --steps 100 --data corpus.txt --lr 1e-3 "
                "--checkpoint-dir ckpt --checkpoint-every 20")
    return p


def _text_of(kind):
    """argparse type: the text as given (runtime.train re-reads it), if `kind` parses it."""
    def check(text: str) -> str:
        try:
            kind(text)
        except ValueError:
            import argparse
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        return text
    check.__name__ = kind.__name__
    return check


def training_flags(args) -> list:
    """The runtime.train flags given to `planner run` itself, as runtime.train's arguments."""
    out: list[str] = []
    for flag, kind, default, _ in RUNTIME_FLAGS:
        value = getattr(args, "train_" + flag[2:].replace("-", "_"), default)
        if kind is bool:
            out += [flag] if value else []
        elif value is not None and value is not default:
            out += [flag, str(value)]
    return out


def launch_command(plan: Plan, plan_path, steps: int, extra=()) -> list:
    """The argv that trains `plan` on this host: export.torchrun_lines' single-node line, with
    `torchrun` replaced by LAUNCHER and `extra` runtime.train flags appended."""
    lines = export.torchrun_lines(plan, plan_path=str(plan_path), steps=steps)
    if len(lines) != 1:
        raise ValueError(f"the plan spans {len(lines)} nodes and `planner run` starts this host "
                         f"only; run the lines of `planner export {plan_path} --to torchrun` "
                         f"(or --to slurm) on the nodes")
    argv = shlex.split(lines[0])
    if argv[0] != "torchrun":  # a change in export that this function must follow
        raise RuntimeError(f"unexpected launcher in the exported line: {lines[0]}")
    return [*LAUNCHER, *argv[1:], *extra]


# --- the plan against this host -----------------------------------------------------------

def cuda_devices() -> tuple:
    """(torch version, number of CUDA devices torch can use here: 0 without CUDA), asked of
    torch in a subprocess (the planner does not import torch)."""
    try:
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError(f"torch did not say within {PROBE_TIMEOUT_S} s whether this host has "
                         f"CUDA devices") from None
    words = out.stdout.split()
    if out.returncode or len(words) < 2 or not words[-1].isdigit():
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"cannot start torch to count this host's GPUs: {last}")
    return words[-2], int(words[-1])


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_memory_bytes():
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _plan_here(plan: Plan) -> str:
    """The command that plans this job for this machine's CPU processes (fp32: the CPU's
    fastest, as in the README's main job)."""
    return (f"planner suggest --model {shlex.quote(plan.model.name)} --cluster cpu "
            f"--global-batch {plan.job.global_batch} --seq-len {plan.job.seq_len} "
            f"--precision fp32 --out plan.json")


def check_host(plan: Plan, plan_path, nodes: int, procs: int) -> dict:
    """Refuse, in one line, a plan this host cannot run: a GPU plan without CUDA (torch's
    view), several nodes, more GPUs than torch sees, far more CPU processes than cores, more
    memory than the host has. Returns the environment the launch needs (a CPU plan runs on
    the CPU even where CUDA exists: CUDA_VISIBLE_DEVICES is emptied)."""
    profile = plan.cluster.profile
    world = plan.cluster.world_size
    if not profile.gpu.host_is_device:  # GPUs: is there CUDA at all?
        version, count = cuda_devices()
        if count == 0:
            build = ", a CPU-only build," if "+cpu" in version else ""
            raise ValueError(
                f"the plan is for {world} GPU(s) (profile {profile.name}, {profile.gpu.name}) "
                f"but torch {version}{build} finds no CUDA device on this host; plan for this "
                f"machine's CPU processes with --cluster cpu ({_plan_here(plan)}), or run this "
                f"plan where its GPUs are")
    if nodes > 1:
        raise ValueError(f"the plan spans {nodes} nodes and `planner run` starts this host "
                         f"only; run the lines of `planner export {plan_path} --to torchrun` "
                         f"(or --to slurm) on the nodes, or plan for one node (--nodes 1)")
    if not profile.gpu.host_is_device:
        if count < procs:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
            raise ValueError(f"the plan needs {procs} GPUs on this host and torch sees "
                             f"{count}{shown}; plan for {count} with --gpus {count} (planner "
                             f"suggest ... --cluster {profile.name} --gpus {count})")
        return {}
    cores = host_cores()
    if procs > MAX_PROCS_PER_CORE * cores:
        raise ValueError(f"the plan starts {procs} processes and this host has {cores} core(s) "
                         f"for them; more than {MAX_PROCS_PER_CORE} per core crawl until "
                         f"their collectives time out: plan for at most "
                         f"{MAX_PROCS_PER_CORE * cores} (--gpus)")
    need = _memory_need(plan, procs)
    have = available_memory_bytes()
    if need and have and need > have:
        raise ValueError(f"the plan's {procs} processes need about {need / 2**30:.1f} GiB "
                         f"(its estimate: {need / procs / 2**30:.2f} GiB on the most loaded "
                         f"rank) and this host has {have / 2**30:.1f} GiB available")
    return {"CUDA_VISIBLE_DEVICES": ""}


def _memory_need(plan: Plan, procs: int):
    if plan.estimate is None:
        return None
    try:
        return procs * float(plan.estimate["memory"]["total_bytes"])
    except (TypeError, KeyError, ValueError):
        return None


@contextlib.contextmanager
def _environment(changes: dict):
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- starting and stopping the run --------------------------------------------------------

def _can_hand_interrupts() -> bool:
    """Blocking SIGINT in the children and finding the ranks needs POSIX signal masks and
    Linux's /proc; elsewhere Ctrl-C goes to the launcher as torchrun expects."""
    return hasattr(signal, "pthread_sigmask") and os.path.isdir("/proc/self/task")


def _block_interrupts() -> None:  # in the child, before exec: inherited by every rank
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def children(pid: int) -> set:
    """The processes whose parent is `pid` (the launcher's ranks), from /proc."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.add(int(entry.name))
    return found


def _interrupt(pids: set) -> set:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGINT)
    return pids


def launch(cmd: list) -> int:
    """Run `cmd`; its exit code (128 + N if it died of signal N).

    Ctrl-C: the launcher and the ranks start with SIGINT blocked, so that it never lands in an
    interpreter still starting up (a rank's Python prints a 50-line "Fatal Python error"
    there) or in torchrun's own start-up (which can swallow it). This process takes it and
    sends SIGINT to each rank; runtime.train unblocks it once it can say so in one line
    (`runtime.train [rank r]: error: interrupted`), and the launcher then exits with the
    ranks' 130. A second Ctrl-C, or ranks still running after STOP_GRACE_S, terminates the
    launcher (SIGTERM, which stops the ranks), a third kills it. SIGTERM to this process is
    passed on to the launcher."""
    handing = _can_hand_interrupts()
    proc = subprocess.Popen(cmd, preexec_fn=_block_interrupts if handing else None)
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, lambda *_: proc.terminate()) if main_thread else None
    presses, since = 0, None
    signalled: set = set()
    try:
        while True:
            try:
                code = proc.wait(timeout=None if since is None else 0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:
                presses += 1
                since = since or time.monotonic()
                if presses >= 3:
                    proc.kill()
                elif presses == 2:
                    proc.terminate()  # (without handing: the launcher had the first itself)
            if handing and presses == 1:
                signalled |= _interrupt(children(proc.pid) - signalled)
                assert since is not None  # set by the press that made presses 1
                if time.monotonic() - since > STOP_GRACE_S:
                    presses = 2
                    proc.terminate()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
        if proc.poll() is None:  # an exception of our own: never leave the run behind
            proc.terminate()  # the launcher stops its ranks
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 128 - code if code < 0 else code


def _procs_per_node(line: str) -> int:
    argv = shlex.split(line.splitlines()[-1])  # a multi-node line starts with '# on node i'
    return int(argv[argv.index("--nproc-per-node") + 1])


def run(args) -> int:
    from planner.plan import Plan, check_compile_flag
    plan = Plan.load(args.plan)  # a bad plan is a one-line error before anything starts
    require_module("torch", "training (planner run)")
    check_compile_flag(plan.layout, getattr(args, "train_compile", False))
    extra = ["--out", args.measured, *training_flags(args),
             *(["--debug"] if getattr(args, "debug", False) else []), *args.passthrough]
    lines = export.torchrun_lines(plan, plan_path=str(args.plan), steps=args.steps)
    env = check_host(plan, args.plan, len(lines), _procs_per_node(lines[0]))
    data = getattr(args, "train_data", None)
    if data is not None and not os.path.exists(data):
        raise ValueError(f"--data {data}: no such file or directory")
    cmd = launch_command(plan, args.plan, args.steps, extra)
    json_out = getattr(args, "json", False)
    with _environment(env), (_stdout_to_stderr() if json_out else contextlib.nullcontext()):
        code = launch(cmd)
    measured = (load_json_file(args.measured, "measured")
                if code == 0 and Path(args.measured).is_file() else None)
    table = None
    if measured is not None:
        from planner.calibration.compare import compare  # the cost model and pandas
        table = compare(plan, measured)
    if json_out and code == 0:
        print_json(_result(args, measured, table))
    elif table is not None:
        print("\nPredicted vs measured (planner compare):")
        print(compare_text(table))
    return code


def _result(args, measured, table) -> dict:
    """--json: what the run wrote and its figures (None where it wrote no measured.json)."""
    got = measured or {}
    return {"plan": str(args.plan), "steps": args.steps,
            "measured": args.measured if measured is not None else None,
            "metrics": getattr(args, "train_metrics", None),
            "step_time_s": got.get("step_time_s"), "tokens_per_s": got.get("tokens_per_s"),
            "val_loss": got.get("val_loss"),
            "compare": table.to_dict(orient="records") if table is not None else None}


@contextlib.contextmanager
def _stdout_to_stderr():
    """The launched processes' standard output on standard error (descriptor 1 -> 2), so that
    with --json standard output holds the JSON object only."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 at all
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
