"""Train under a plan: `torchrun --nproc-per-node N -m runtime.train --plan plan.json --steps S`.

Writes a per-step log line on rank 0, with --metrics one JSON line per step (runtime/metrics.py)
and, with --out, measured.json (step times, tokens/s and per-rank memory by component) for
`planner compare`. Every fault ends the rank with one line on
stderr and an exit code of runtime/faults.py: 2 bad input (flags, checked before any process
group; plan, world size, data, checkpoint), 3 non-finite loss (the last good checkpoint is kept),
4 a peer lost or a collective timed out, 1 anything else; --debug adds the traceback."""

import argparse
import logging
import math
import os
import pathlib
import signal
import statistics
import sys
import time
from dataclasses import dataclass

from planner.plan import Plan, check_compile_flag
from planner.units import fmt_seconds
from runtime import faults

log = logging.getLogger("runtime")
PROG = "runtime.train"
EXIT_BAD_INPUT, EXIT_NONFINITE = faults.EXIT_BAD_INPUT, faults.EXIT_DIVERGED
MAX_TIMEOUT_S = 7 * 24 * 3600
MAX_SEED = 2**32
VAL_BATCHES = 4


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    steps: int
    data: str | None = None
    data_cap_bytes: int = 8 << 20
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    out: str | None = None
    seed: int = 0
    val_batches: int = VAL_BATCHES
    measure_step: int = 1  # the step whose memory is recorded (step 0 includes warm-up)
    metrics: str | None = None  # JSONL of one line per step (runtime/metrics.py)
    eval_every: int = 0  # validation loss every K steps (0: only at the end)
    tensorboard: str | None = None  # TensorBoard event directory (torch.utils.tensorboard)
    init_from: str | None = None  # Hugging Face checkpoint directory (runtime/hf_weights.py)
    tokenizer: str | None = None  # tokenizer.json or its directory (runtime/data.py)
    lora_merge_out: str | None = None  # LoRA: write the merged weights here at the end

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")
        if (self.checkpoint_every or self.resume) and not self.checkpoint_dir:
            raise ValueError("--checkpoint-every and --resume need --checkpoint-dir")


class _Parser(argparse.ArgumentParser):
    """Usage errors as a ValueError (one line, exit code 2), not argparse's usage dump."""

    def error(self, message):
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    """The flags (`planner run` shows a copy of them: planner.cli.run.RUNTIME_FLAGS)."""
    p = _Parser(prog="python -m runtime.train", description=__doc__.split("\n")[0])
    p.add_argument("--plan", required=True, help="plan.json written by `planner suggest`")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps to run (in total)")
    p.add_argument("--data", help="text file, directory of text files, or .bin token ids "
                   "(uint16; *.uint32.bin: uint32) (default: this Python's standard-library "
                   "sources)")
    p.add_argument("--data-cap-mb", type=float, default=8.0, help="bytes of text to read (MiB)")
    p.add_argument("--checkpoint-dir",
                   help="directory of the checkpoints (--checkpoint-every, --resume)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="save every K steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--out", help="write measured.json here")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=0, help="warmup steps (0: a tenth of --steps)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip (0: off)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the data order and dropout")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block: the plan's compile (refused if it is off)")
    p.add_argument("--metrics", help="append one JSON line per step here (loss, lr, step "
                   "time, tokens/s, grad norm, memory; val_loss on evaluated steps)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="validation loss every K steps (0: only at the end)")
    p.add_argument("--tensorboard", help="also write TensorBoard events to this directory "
                   "(needs the tensorboard package)")
    p.add_argument("--init-from", help="start from a Hugging Face checkpoint directory "
                   "(config.json and *.safetensors, sharded or not) of the plan's model")
    p.add_argument("--tokenizer", help="tokenise text data with this tokenizer.json (or a "
                   "directory holding one; needs the tokenizers package)")
    p.add_argument("--lora-merge-out", help="LoRA plans: at the end, fold the adapters into "
                   "the base weights (W + alpha/r B A) and write DIR/merged.pt, a full state "
                   "dict without adapters")
    p.add_argument("--timeout", type=float, default=60.0, help="collective timeout (s)")
    p.add_argument("--debug", action="store_true", help="print the traceback of a failure")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def _need(ok: bool, flag: str, value, what: str) -> None:
    if not ok:
        raise ValueError(f"{flag} must be {what}, got {value!r}")


def check_args(args) -> None:
    """Every flag's value, before any process group exists (ValueError naming flag and value)."""
    from pathlib import Path
    finite = math.isfinite
    _need(args.steps >= 1, "--steps", args.steps, ">= 1")
    _need(finite(args.data_cap_mb) and args.data_cap_mb > 0, "--data-cap-mb", args.data_cap_mb,
          "a finite number > 0")
    _need(args.checkpoint_every >= 0, "--checkpoint-every", args.checkpoint_every, ">= 0")
    _need(finite(args.lr) and args.lr > 0, "--lr", args.lr, "a finite number > 0")
    _need(args.warmup >= 0, "--warmup", args.warmup, ">= 0")
    _need(args.eval_every >= 0, "--eval-every", args.eval_every, ">= 0 (0: only at the end)")
    _need(finite(args.grad_clip) and args.grad_clip >= 0, "--grad-clip", args.grad_clip,
          "a finite number >= 0 (0: off)")
    _need(0 <= args.seed < MAX_SEED, "--seed", args.seed, f"in [0, {MAX_SEED})")
    _need(finite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT_S, "--timeout", args.timeout,
          f"a number of seconds in (0, {MAX_TIMEOUT_S}]")
    if args.data is not None:
        from runtime.data import check_data_path
        check_data_path(args.data)
    for flag, path in (("--out", args.out), ("--metrics", args.metrics)):
        if path is not None:
            out = Path(path)
            _need(not out.is_dir(), flag, path, "a file path, not a directory")
            _need(out.parent.is_dir(), flag, path, "in an existing directory")
    if args.tensorboard is not None:
        from runtime.metrics import tensorboard_writer_class
        tensorboard_writer_class()  # a missing tensorboard: one line before any process group
    if args.lora_merge_out is not None:
        out = Path(args.lora_merge_out)
        _need(out.is_dir() or not out.exists(), "--lora-merge-out", args.lora_merge_out,
              "a directory")
    if args.checkpoint_dir is not None:
        ck = Path(args.checkpoint_dir)
        _need(ck.is_dir() or not ck.exists(), "--checkpoint-dir", args.checkpoint_dir,
              "a directory")


def _setup_logging(rank: int) -> None:
    if rank == 0 and not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _log_step(step, total, loss, lr, dt, tokens, mem_bytes) -> None:
    log.info(f"{_bar(step + 1, total)} step {step + 1:>5}/{total}  loss {loss:8.4f}  "
             f"lr {lr:.2e}  {fmt_seconds(dt):>10}  {tokens / dt:10.0f} tok/s  "
             f"mem {mem_bytes / 2**20:8.1f} MiB")


class Trainer:
    """Everything of one rank's run; `run()` returns the measured record (rank 0: full)."""

    def __init__(self, plan: Plan, cfg: RunConfig, optim_cfg, ctx, tokens=None):
        from runtime.engine import Engine
        self.plan, self.cfg, self.ctx = plan, cfg, ctx
        if tokens is None:
            tokens = load_data(plan, cfg)
        self.data = _token_data(plan, cfg, tokens, ctx.dp_rank)
        self.engine = Engine(plan, ctx, optim_cfg, seed=cfg.seed,  # compiles if plan says so
                             init_from=cfg.init_from)
        report = self.engine.init_report
        if report is not None:
            kept = report["kept"]
            log.info(f"weights from {cfg.init_from}: {len(report['loaded'])} tensors on rank 0"
                     + (f"; initialised here: {', '.join(kept)}" if kept else ""))
        self.optim_cfg = optim_cfg
        self.steps: list[dict] = []
        self.record: dict = {}
        # (step, validation loss) of the latest --eval-every evaluation
        self.last_val: tuple | None = None
        self.accuracy: float | None = None  # classify: accuracy of the latest validation

    def _start_step(self) -> int:
        import os

        from runtime import checkpoint
        root = self.cfg.checkpoint_dir
        path: pathlib.Path | None
        if self.cfg.resume:
            path = checkpoint.resume_path(root)  # ValueError: nothing to resume
        elif root and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            path = checkpoint.latest(root)  # a torchrun restart continues where it can
        else:
            return 0
        if path is None:
            log.info(f"no checkpoint in {root} yet; starting at step 0")
            return 0
        step = checkpoint.load(self.engine, path)
        log.info(f"resumed from {path} at step {step}")
        return step

    def run(self) -> dict:
        from runtime import checkpoint
        with checkpoint.exclusive(self.cfg.checkpoint_dir):  # one run per checkpoint directory
            return self._run()

    def _run(self) -> dict:
        total = self.cfg.steps
        tokens_per_step = self.plan.job.global_batch * self.plan.job.seq_len
        start = self._start_step()
        writer = self._metrics_writer(resumed=start > 0)
        try:
            for step in range(start, total):
                self._step(step, tokens_per_step, start, writer)
        finally:
            if writer is not None:
                writer.close()
        return self._measured()

    def _metrics_writer(self, resumed: bool):
        """Rank 0's metrics file (appended to when the run resumes), or None."""
        if self.ctx.rank != 0 or not (self.cfg.metrics or self.cfg.tensorboard):
            return None
        from runtime.metrics import MetricsWriter
        return MetricsWriter(self.cfg.metrics, self.cfg.tensorboard, resume=resumed)

    def _step(self, step: int, tokens_per_step: int, start: int, writer) -> None:
        import torch

        from runtime import checkpoint, measure
        from runtime.optim import lr_at
        cfg, total = self.cfg, self.cfg.steps
        lr = lr_at(step, total, self.optim_cfg)
        self.engine.set_lr(lr)
        inputs, labels = self.data.batch(step)
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout: a function of the step
        record: dict | None = {} if step == min(start + cfg.measure_step, total - 1) else None
        t0 = time.perf_counter()
        loss = self.engine.train_step(inputs.to(self.ctx.device),
                                      labels.to(self.ctx.device), record)
        _sync(self.ctx.device)
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise NonFiniteLoss(step, loss)
        if record:
            self.record = record
        self.steps.append({"step": step, "loss": loss, "step_time_s": dt,
                           "tokens_per_s": tokens_per_step / dt, "lr": lr})
        memory = measure.current_memory_bytes(self.ctx.device)
        _log_step(step, total, loss, lr, dt, tokens_per_step, memory)
        if self.plan.job.task != "pretrain":
            self.steps[-1]["loss_tokens"] = self.engine.loss_tokens
        row = {**self.steps[-1], "grad_norm": getattr(self.engine, "last_grad_norm", None),
               "memory_bytes": memory,
               "peak_allocated_bytes": measure.peak_allocated_bytes(self.ctx.device)}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            row["val_loss"] = self.validation_loss()  # every rank: a collective
            if self.accuracy is not None:
                row["val_accuracy"] = self.accuracy
            self.last_val = (step, row["val_loss"])
            log.info(f"step {step + 1}: validation loss {row['val_loss']:.4f}")
        if writer is not None:
            writer.write(row)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            path = checkpoint.save(self.engine, cfg.checkpoint_dir, step + 1)
            log.info(f"saved checkpoint {path}")

    def validation_loss(self) -> float:
        """Mean held-out loss; a classify job also sets self.accuracy (pooled positions)."""
        losses, right = [], []
        for i in range(self.cfg.val_batches):
            x, y = (t.to(self.ctx.device) for t in self.data.val_batch(i))
            if self.plan.job.task == "classify":
                loss, acc = self.engine.eval_accuracy(x, y)
                right.append(acc)
            else:
                loss = self.engine.eval_loss(x, y)
            losses.append(loss)
        if right:
            self.accuracy = sum(right) / len(right)
        return sum(losses) / len(losses)

    def _measured(self) -> dict:
        import torch.distributed as dist

        from runtime import measure
        done = self.steps[-1]["step"] if self.steps else None
        if self.last_val is not None and self.last_val[0] == done:
            val = self.last_val[1]  # the last step was just evaluated: the same batches
        else:
            val = self.validation_loss()
        log.info(f"validation loss {val:.4f} ({self.cfg.val_batches} held-out batches)")
        if self.accuracy is not None:
            log.info(f"validation accuracy {self.accuracy:.4f}")
        if self.cfg.lora_merge_out:
            from runtime.lora import save_merged
            path = save_merged(self.engine, self.cfg.lora_merge_out)
            if path:
                log.info(f"wrote the merged weights to {path}")
        empty = dict.fromkeys(("weights_bytes", "gradients_bytes", "optimizer_bytes",
                               "activation_bytes_per_microbatch", "activation_peak_bytes"))
        mine = {"rank": self.ctx.rank, "coords": dict(self.ctx.coords), **empty, **self.record,
                "peak_allocated_bytes": measure.peak_allocated_bytes(self.ctx.device),
                "max_rss_bytes": measure.max_rss_bytes()}
        ranks = [None] * self.ctx.world_size
        dist.all_gather_object(ranks, mine)
        times = [s["step_time_s"] for s in self.steps]
        median = statistics.median(times[1:] if len(times) > 1 else times) if times else None
        tokens = self.plan.job.global_batch * self.plan.job.seq_len
        steps = [{k: v for k, v in s.items() if k != "loss_tokens"} for s in self.steps]
        return {"schema_version": 1, "plan": self.plan.to_dict(), "steps": steps,
                "val_loss": val, "step_time_s": median,
                "tokens_per_s": tokens / median if median else None, "ranks": ranks}


def load_data(plan: Plan, cfg: RunConfig):
    """The run's tokens (ValueError if unusable: missing, special file, ids >= vocab, too few);
    for a classify or sft plan its samples (runtime/tasks.py), tokenised by --tokenizer if given."""
    from runtime.data import load_tokenizer, load_tokens
    tok = load_tokenizer(cfg.tokenizer, plan.model.vocab_size) if cfg.tokenizer else None
    if plan.job.task != "pretrain":
        from runtime.tasks import encode_bytes, task_samples
        encode = encode_bytes if tok is None else (lambda text: tok.encode(text).ids)
        return task_samples(plan, cfg.data, cap_bytes=cfg.data_cap_bytes, encode=encode)
    tokens = load_tokens(cfg.data, plan.model.vocab_size, cfg.data_cap_bytes, tokenizer=tok)
    _token_data(plan, cfg, tokens, 0)  # too few tokens for the sequence length: refuse now
    return tokens


def _token_data(plan: Plan, cfg: RunConfig, tokens, dp_rank: int):
    if plan.job.task != "pretrain":
        from runtime.tasks import TaskData
        return TaskData(tokens, plan.layout, dp_rank, cfg.seed)
    from runtime.data import TokenData, load_tokenizer, mask_token_id
    tok = load_tokenizer(cfg.tokenizer, plan.model.vocab_size) if cfg.tokenizer else None
    return TokenData(tokens, plan.job.seq_len, plan.layout, dp_rank, causal=plan.model.causal,
                     vocab_size=plan.model.vocab_size, seed=cfg.seed,
                     mask_id=mask_token_id(tok, plan.model.vocab_size))


class NonFiniteLoss(faults.Diverged):
    def __init__(self, step, loss):
        super().__init__(f"loss is {loss} at step {step + 1}; stopping (the last saved "
                         f"checkpoint, if any, is from before this step)")


def _sync(device) -> None:
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    """Run one rank; returns its exit code (faults.EXIT_*), having printed one line on failure.

    On failure the process group is left as it is (no barrier with a peer that may be dead, no
    teardown that can abort): the caller exits at once (`faults.hard_exit`, see __main__)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug, timeout_s = "--debug" in argv, None
    try:
        _take_interrupts()
        args = parse_args(argv)
        timeout_s = args.timeout
        check_args(args)
        plan = Plan.load(args.plan)
        check_compile_flag(plan.layout, args.compile)
        from runtime.fp8 import check_fp8
        check_fp8(plan)
        cfg = RunConfig(steps=args.steps, data=args.data,
                        data_cap_bytes=int(args.data_cap_mb * 2**20),
                        checkpoint_dir=args.checkpoint_dir,
                        checkpoint_every=args.checkpoint_every, resume=args.resume,
                        out=args.out, seed=args.seed, metrics=args.metrics,
                        eval_every=args.eval_every, tensorboard=args.tensorboard,
                        init_from=args.init_from, tokenizer=args.tokenizer,
                        lora_merge_out=args.lora_merge_out)
        if args.init_from:  # config, files and shapes before any process group
            from runtime.hf_weights import Checkpoint
            Checkpoint(args.init_from, plan.model)
        if args.lora_merge_out and plan.job.lora is None:
            raise ValueError(f"--lora-merge-out {args.lora_merge_out}: the plan has no lora "
                             f"(plan with --lora-rank)")
        from runtime.mesh import check_world_size
        from runtime.optim import OptimConfig
        check_world_size(plan.layout)
        optim_cfg = OptimConfig(lr=args.lr, warmup_steps=args.warmup, grad_clip=args.grad_clip)
        tokens = load_data(plan, cfg)  # data faults too come before any process group
        return _run(plan, cfg, optim_cfg, tokens, args)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every fault: a line, a code
        return faults.report_exception(PROG, exc, debug=debug, timeout_s=timeout_s)


def _take_interrupts() -> None:
    """`planner run` starts the ranks with SIGINT blocked, so that a Ctrl-C during the
    interpreter's start-up (where Python prints a 50-line fatal error) waits here; from now on
    it is reported in one line (a pending one at once): by `_interrupted` when the rank runs as
    a program, else as a KeyboardInterrupt by main()."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _run(plan: Plan, cfg: RunConfig, optim_cfg, tokens, args) -> int:
    import torch.distributed as dist

    from runtime.mesh import init_distributed
    ctx = init_distributed(plan.layout, timeout_s=args.timeout)
    _setup_logging(ctx.rank)
    lay = plan.layout
    log.info(f"plan: {plan.model.name} dp={lay.dp} tp={lay.tp} pp={lay.pp} "
             f"zero={lay.zero_stage} schedule={lay.schedule} "
             f"micro_batch={lay.micro_batch}x{lay.num_microbatches} "
             f"seq={plan.job.seq_len} {plan.job.precision} on {ctx.device.type}")
    measured = Trainer(plan, cfg, optim_cfg, ctx, tokens).run()
    if ctx.rank == 0 and cfg.out:
        # through the typed file, so what compare, calibrate and the UI read is checked here
        from planner.measured import Measured
        Measured.from_dict(measured).save(cfg.out)
        log.info(f"wrote {cfg.out}")
    # tear down together: a rank destroying gloo while a peer still writes its output can
    # abort at exit ("terminate called without an active exception"). Only on success: on
    # a fault the peers may be dead or elsewhere, and main() reports and exits instead.
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _interrupted(signum, frame) -> None:
    """SIGINT on a rank run as a program (torchrun, `planner run`): its one line, then out at
    once. A KeyboardInterrupt raised instead can land inside a Python callback of C++ code,
    which then aborts the process with a C++ "terminate called after throwing". SIGTERM waits
    meanwhile: torchrun sends it to the other ranks once one has stopped, and it then reads the
    error file of each, which must not be half written."""
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        faults.report(PROG, faults.EXIT_INTERRUPTED, "interrupted")
        faults.hard_exit(faults.EXIT_INTERRUPTED)
    finally:  # a flush that failed halfway: leave all the same
        os._exit(faults.EXIT_INTERRUPTED)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupted)
    code = main()
    if code:
        faults.hard_exit(code)
    sys.exit(0)
