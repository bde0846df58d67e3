"""One DeepSpeed training step under an exported config, on CPU (gloo): run by
tests/test_export_consumers.py as `torchrun --standalone --nproc-per-node N ds_export_step.py
CONFIG MODE OUT`, MODE one of plain, pipe (a 2-stage deepspeed.pipe.PipelineModule) or autotp
(AutoTP with the mpu the export's note names).  Rank 0 writes what DeepSpeed built to OUT.

Two test-only changes, neither in the exported config's meaning: the optimizer runs as
torch.optim.AdamW (`torch_adam`) instead of DeepSpeed's JIT-compiled Adam kernel, and the
shared-memory collective kernel DeepSpeed would compile for CPU is skipped; both builds take
minutes on a CPU.  AutoTP gets the 'llama' preset because the toy model is not a Hugging Face
model."""

import importlib
import json
import math
import os
import sys
import types

import deepspeed
import torch
from deepspeed.pipe import PipelineModule

importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

H = 16


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, torch.nn.Linear(H, H, bias=False))

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * self.k_proj(x) + self.v_proj(x))


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = torch.nn.Linear(H, 2 * H, bias=False)
        self.up_proj = torch.nn.Linear(H, 2 * H, bias=False)
        self.down_proj = torch.nn.Linear(2 * H, H, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = Attention(), Mlp()

    def forward(self, x):
        x = x + self.self_attn(x)
        return x + self.mlp(x)


class Model(torch.nn.Module):
    """Llama-named linear layers (what AutoTP's llama preset shards) and a config."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=H, num_attention_heads=4,
                                            num_key_value_heads=4)
        self.layers = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def model_state_bytes(engine) -> dict:
    """What DeepSpeed holds for the rank's parameters after a step, by kind: the module's
    16-bit (or fp32) weights (ZeRO-3: the rank's partitions), the optimizer's own fp32 master
    copies (the parameters its inner optimizer updates, where they are not the module's), and
    AdamW's exp_avg and exp_avg_sq; `numel` is the rank's parameter count."""
    params = list(engine.module.parameters())
    zero3 = hasattr(params[0], "ds_tensor")
    numel = sum(p.ds_numel if zero3 else p.numel() for p in params)
    weights = sum(_nbytes(p.ds_tensor if zero3 else p) for p in params)
    module_storages = {p.untyped_storage().data_ptr() for p in params if p.numel()}
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    # ZeRO-3 puts its fp32 partitions into the inner optimizer's groups only while it steps
    updated = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or \
        [p for group in inner.param_groups for p in group["params"]]
    master = sum(_nbytes(p) for p in updated
                 if p.untyped_storage().data_ptr() not in module_storages)
    moments = sum(_nbytes(state[key]) for state in inner.state.values()
                  for key in ("exp_avg", "exp_avg_sq") if key in state)
    return {"numel": numel, "weights_bytes": weights, "master_bytes": master,
            "moment_bytes": moments}


def main(config_path, mode, out_path):
    with open(config_path) as f:
        cfg = json.load(f)
    cfg["optimizer"]["params"]["torch_adam"] = True
    torch.manual_seed(0)
    kwargs = {}
    if mode == "pipe":
        deepspeed.init_distributed(dist_backend="gloo")
        model = PipelineModule(layers=[Block() for _ in range(4)], num_stages=2,
                               loss_fn=lambda out, target: (out.float() - target.float()).pow(2)
                               .mean(), partition_method="uniform")
    else:
        model = Model()
    if mode == "autotp":
        cfg["tensor_parallel"]["preset_model"] = "llama"
        deepspeed.init_distributed(dist_backend="gloo")
        from deepspeed.utils import groups
        groups._init_tp_mesh_device(tensor_model_parallel_size=cfg["tensor_parallel"]
                                    ["autotp_size"])
        kwargs["mpu"] = groups
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg, **kwargs)
    model_dtype, accum_dtype = engine.get_data_types()
    mb = engine.train_micro_batch_size_per_gpu()
    torch.manual_seed(1)  # the same micro-batches on every rank (AutoTP checks its TP group)
    if mode == "pipe":
        batches = iter([(torch.randn(mb, H, dtype=model_dtype), torch.randn(mb, H))
                        for _ in range(engine.gradient_accumulation_steps())])
        loss = engine.train_batch(data_iter=batches)
    else:
        for _ in range(engine.gradient_accumulation_steps()):
            loss = engine(torch.randn(mb, H, dtype=model_dtype)).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
    if int(os.environ["RANK"]) == 0:
        result = {"engine": type(engine).__name__, "optimizer": type(engine.optimizer).__name__,
                  "model_dtype": str(model_dtype), "grad_accum_dtype": str(accum_dtype),
                  "communication_data_type": str(engine.communication_data_type),
                  "train_batch_size": engine.train_batch_size(),
                  "global_steps": engine.global_steps, "loss": float(loss.detach()),
                  "loss_finite": math.isfinite(float(loss.detach())),
                  "model_states": model_state_bytes(engine)}
        if mode == "pipe":
            result["activation_checkpoint_interval"] = engine.module.activation_checkpoint_interval
        if mode == "autotp":
            result["q_proj_shape"] = list(engine.module.layers[0].self_attn.q_proj.weight.shape)
        with open(out_path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    # every rank is done with its collectives before any leaves; then skip the interpreter's
    # teardown, where a thread of DeepSpeed or gloo left joinable now and then aborts the
    # process ("terminate called without an active exception") after a good step
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
