"""One rank's share of a training job under a plan: model chunks, wrappers, schedule, optimizer,
and the training/validation step. train.py drives it; tests call it directly."""

import contextlib
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from runtime import measure
from runtime.amp import LossScaler
from runtime.mesh import pair_group
from runtime.model import canonical_name, materialize
from runtime.optim import OptimConfig, build_adamw, build_sharded_adamw, clip_grad_norm
from runtime.lora import apply_lora, check_runtime_lora
from runtime.parallelize import DTYPES, apply_ddp, parallelize
from runtime.pipeline import build_chunks, build_schedule, lm_loss_sum


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _init_from(parts: list, path, spec) -> dict:
    """Overwrite the seeded weights with a Hugging Face checkpoint's (runtime/hf_weights.py):
    this rank's blocks of its chunks only."""
    from runtime.hf_weights import Checkpoint, load_into
    ckpt = Checkpoint(path, spec)
    report: dict[str, list] = {"loaded": [], "kept": []}
    for part in parts:
        for key, names in load_into(part, ckpt).items():
            report[key] += names
    return report


class Engine:
    def __init__(self, plan, ctx, optim_cfg: OptimConfig = OptimConfig(), seed: int = 0,
                 init_from=None):
        self.plan, self.ctx, self.cfg, self.seed = plan, ctx, optim_cfg, seed
        spec, lay, job = plan.model, plan.layout, plan.job
        check_runtime_lora(job.lora)
        self.classify = job.task == "classify"
        chunks = build_chunks(spec, lay, ctx.pp_rank,
                              num_labels=job.num_labels if self.classify else None)
        self.chunk_ids = [c for c, _ in chunks]
        self.parts = [m for _, m in chunks]
        for part in self.parts:  # LoRA: adapters on the meta model, base frozen
            apply_lora(part, job.lora, DTYPES[job.dtype])
        # classify: [correct, counted] while evaluating (accuracy)
        self.correct: torch.Tensor | None = None
        wraps = {parallelize(part, lay, plan.job.dtype, ctx, compile_blocks=lay.compile,
                             fp8_recipe=plan.job.fp8_recipe)
                 for part in self.parts}
        for part in self.parts:
            materialize(part, ctx.device, seed)
        self.init_report: dict | None = (_init_from(self.parts, init_from, spec) if init_from
                                         else None)
        self.ddp = wraps == {"ddp"}
        self.modules: list = [apply_ddp(p, ctx.group("dp")) if self.ddp else p for p in self.parts]
        self.loss_scale = 1.0
        self.scaler = LossScaler(plan.job.precision == "fp16")
        self.schedule = (build_schedule(self.modules, self.chunk_ids, lay, ctx, self.loss_fn)
                         if lay.pp > 1 else None)
        self.has_first = 0 in self.chunk_ids
        self.has_last = lay.num_chunks - 1 in self.chunk_ids
        self._setup_tied()
        if lay.zero_stage == 1 and lay.dp > 1:
            self.optimizers: list = [build_sharded_adamw(self.trained_parameters(),
                                                         ctx.group("dp"), optim_cfg)]
        else:
            self.optimizers = [build_adamw(p, optim_cfg) for p in self.parts]

    def trained_parameters(self) -> list:
        """named_parameters() that get gradients (LoRA: adapters and a classifier only)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # --- parameters -------------------------------------------------------------------------
    def named_parameters(self) -> list:
        """[(canonical name, parameter)] over this rank's chunks (a tied copy keeps its own
        entry under the embedding's name)."""
        return [(canonical_name(self.plan.model, n), p)
                for part in self.parts for n, p in part.named_parameters()]

    def _setup_tied(self) -> None:
        """Tied embeddings split over chunks: the copy's gradient is summed with the
        embedding's each step (Narayanan et al. 2021, Sec. 4.1)."""
        lay, spec = self.plan.layout, self.plan.model
        self.tied_params, self.tied_group = [], None
        if not (spec.tie_embeddings and lay.num_chunks > 1) or self.classify:
            return
        first, last = lay.chunk_rank(0), lay.chunk_rank(lay.num_chunks - 1)
        if first != last:
            self.tied_group = pair_group(self.ctx, first, last)
        for part in self.parts:
            if part.embed is not None:
                self.tied_params.append(part.embed.wte.weight)
            elif part.head is not None:
                self.tied_params.append(part.head.output.weight)

    def _sync_tied(self) -> None:
        grads = [_local(p.grad) for p in self.tied_params if p.grad is not None]
        if not grads:
            return
        if len(grads) == 2:
            grads[0].add_(grads[1])
        if self.tied_group is not None:
            dist.all_reduce(grads[0], group=self.tied_group)
        for g in grads[1:]:
            g.copy_(grads[0])

    def clip_entries(self) -> list:
        copies = 2 if self.plan.model.tie_embeddings and self.plan.layout.num_chunks > 1 else 1
        tied = {id(p) for p in self.tied_params}
        return [(p, copies if id(p) in tied else 1) for _, p in self.trained_parameters()]

    # --- steps ------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def _loss_ctx(self):
        return loss_parallel() if self.plan.layout.tp > 1 else contextlib.nullcontext()

    def set_loss_scale(self, labels) -> None:
        """Normalise by the global batch's label count, so every layout computes the same mean
        (BERT's masked positions differ per micro-batch). Schedules divide gradients by the
        micro-batch count and data parallelism averages over dp, hence nmb * dp / count."""
        count = (labels != -100).sum().double()
        lay = self.plan.layout
        if lay.dp > 1:
            dist.all_reduce(count, group=self.ctx.group("dp"))
        self.loss_tokens = int(count)  # positions in the loss (sft: response tokens)
        self.loss_scale = lay.num_microbatches * lay.dp / max(1.0, float(count))

    def loss_fn(self, logits, labels):
        if self.correct is not None:  # evaluating a classifier: count the right answers
            kept = labels != -100
            hits = (_local(logits).detach().argmax(-1) == labels) & kept
            self.correct += torch.stack([hits.sum(), kept.sum()]).double()
        return lm_loss_sum(logits, labels) * (self.loss_scale * self.scaler.scale)

    def _accumulate(self, inputs, labels, train: bool = True) -> torch.Tensor:
        """pp == 1: gradient accumulation over the plan's micro-batches."""
        nmb, module = self.plan.layout.num_microbatches, self.modules[0]
        total = torch.zeros((), device=self.ctx.device)
        for m, (x, y) in enumerate(zip(inputs.chunk(nmb), labels.chunk(nmb))):
            skip_sync = self.ddp and m < nmb - 1
            with (module.no_sync() if skip_sync and train else contextlib.nullcontext()), \
                    self._loss_ctx():
                loss = self.loss_fn(module(x), y)
                if train:
                    (loss / nmb).backward()
            total += _local(loss.detach())
        return total / nmb

    def _pipeline(self, inputs, labels, train: bool = True) -> torch.Tensor:
        losses: list | None = [] if self.has_last else None
        assert self.schedule is not None  # pp > 1
        args = (inputs,) if self.has_first else ()
        target = labels if self.has_last else None
        with self._loss_ctx():
            if train:
                self.schedule.step(*args, target=target, losses=losses)
            else:
                self.schedule.eval(*args, target=target, losses=losses)
        if losses is None:  # not the last stage
            return torch.zeros((), device=self.ctx.device)
        return torch.stack([_local(x.detach()).float() for x in losses]).mean()

    def global_loss(self, local_loss: torch.Tensor) -> float:
        """Mean loss over data-parallel ranks, known to every rank."""
        value = local_loss.detach().double() if self.has_last else torch.zeros(
            (), dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(value)
        return float(value) / (self.plan.layout.dp * self.plan.layout.tp * self.scaler.scale)

    def forward_backward(self, inputs, labels) -> float:
        self.set_loss_scale(labels)
        if self.schedule is not None:
            local_loss = self._pipeline(inputs, labels)
        else:
            local_loss = self._accumulate(inputs, labels)
        self._shard_grads_like_params()
        self._sync_tied()
        return self.global_loss(local_loss)

    def _shard_grads_like_params(self) -> None:
        """DTensor computes the vocabulary-parallel embedding's gradient replicated (full v x h
        on every TP rank); keep only this rank's rows, as the parameter (a local slice)."""
        for _, p in self.named_parameters():
            g = p.grad
            if isinstance(g, DTensor) and g.placements != p.placements:
                p.grad = g.redistribute(p.device_mesh, p.placements)

    def optimizer_step(self) -> float | None:
        """Clip by the global norm, step, clear gradients; returns the norm before clipping
        (None when fp16 gradients overflowed and the step was skipped)."""
        entries = self.clip_entries()
        overflow = self.scaler.unscale([p for p, _ in entries], self.ctx.device)
        self.scaler.update(overflow)
        if overflow:
            self.zero_grad()
            return None
        norm = clip_grad_norm(entries, self.cfg.grad_clip, self.ctx)
        for opt in self.optimizers:
            opt.step()
        self.zero_grad()
        return norm

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def train_step(self, inputs, labels, record: dict | None = None) -> float:
        """One optimizer step; a non-finite loss skips the update and is returned as is.
        With `record` (a dict), fill it with this rank's measured memory by component."""
        counter = measure.ActivationCounter(self.parts) if record is not None else None
        with counter.hooks() if counter else contextlib.nullcontext():
            loss = self.forward_backward(inputs, labels)
        if not math.isfinite(loss):
            self.zero_grad()
            self.last_grad_norm = None
            return loss
        params = [p for _, p in self.named_parameters()]
        grads_bytes = measure.gradients_bytes(params) if counter else 0
        self.last_grad_norm = self.optimizer_step()  # for the metrics line (runtime.metrics)
        if counter and record is not None:
            record.update(
                weights_bytes=measure.weights_bytes(params), gradients_bytes=grads_bytes,
                optimizer_bytes=measure.optimizer_bytes(self.optimizers),
                activation_bytes_per_microbatch=counter.total_bytes
                / self.plan.layout.num_microbatches,
                activation_peak_bytes=counter.peak_bytes)
        return loss

    def eval_accuracy(self, inputs, labels) -> tuple:
        """(validation loss, accuracy at the pooled positions, over all ranks) of a classify
        job's held-out batch."""
        self.correct = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        try:
            loss = self.eval_loss(inputs, labels)
            counts = self.correct
            assert counts is not None
        finally:
            self.correct = None
        dist.all_reduce(counts)  # each data-parallel replica's last stage counted its share
        return loss, float(counts[0] / counts[1].clamp(min=1))

    @torch.no_grad()
    def eval_loss(self, inputs, labels) -> float:
        for m in self.modules:
            m.eval()
        self.set_loss_scale(labels)
        try:
            if self.schedule is not None and self.plan.layout.schedule == "zbv":
                # PyTorch 2.13's ZB-V runtime asserts in eval(): run a training step's
                # forward/backward and drop the gradients.
                with torch.enable_grad():
                    local_loss = self._pipeline(inputs, labels, train=True)
                self.zero_grad()
            elif self.schedule is not None:
                local_loss = self._pipeline(inputs, labels, train=False)
            else:
                local_loss = self._accumulate(inputs, labels, train=False)
        finally:
            for m in self.modules:
                m.train()
        return self.global_loss(local_loss)
