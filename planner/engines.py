"""What each engine does, in one place: the cost model, the rules and the search ask these traits
and never compare engine names.

`torch` is this project's runtime (PyTorch DTensor TP/SP, FSDP2, torch.distributed.pipelining,
torch.optim.AdamW); `megatron` is Megatron-LM (Korthikanti et al. 2022; Shoeybi et al. 2019);
`deepspeed` is DeepSpeed 0.19.8 running the user's eager PyTorch model (its ZeRO, BF16 and FP16
optimizers, its pipeline engine, AutoTP; planner/cost/deepspeed.py)."""

from dataclasses import dataclass

from planner.units import ADAM_STATE_BYTES_FP32, ADAM_STATE_BYTES_MIXED

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")
INTERLEAVED = ("interleaved_1f1b", "interleaved_zb", "zbv")   # several chunks per rank
ZERO_BUBBLE = ("interleaved_zb", "zbv")                       # backward split into I and W
# none; selective: the attention core (Korthikanti et al. 2022, Sec. 5); op: torchtitan's op-level
# selective checkpointing (save every other mm, attention and reduce-scatter outputs); full: keep
# only the block input
RECOMPUTE = ("none", "selective", "op", "full")
# how context-parallel attention sees the whole sequence: all-gather of K/V (Llama 3, Dubey et
# al. 2024 Sec. 3.3.2), a ring of K/V blocks (Liu et al. 2023), or all-to-all over heads
# (DeepSpeed-Ulysses, Jacobs et al. 2023); planner/cost/context.py
CP_COMMS = ("allgather", "ring", "a2a")
RECOMPUTE_EVERY_CHOICES = (1, 2, 4)  # the K the search tries where a policy is on
ZERO_STAGES = (0, 1, 2, 3)
# CPU offload (planner/cost/offload.py): nothing; the optimizer states; also the parameters
OFFLOADS = ("none", "optimizer", "params")
DDP_STAGES = (0, 1)          # gradients all-reduced (DDP or FSDP2's replicate under TP)
SHARDED_GRAD_STAGES = (2, 3)  # FSDP2: reduce-scatter per micro-batch


@dataclass(frozen=True)
class Engine:
    name: str
    schedules: tuple                 # pipeline schedules it runs (the search lists only these)
    zero_stages: tuple               # ZeRO stages it runs
    fp32_master_params: bool         # parameters are fp32, computed in 16 bits (FSDP2/autocast)
    sp_saves_sharded_gemm_input: bool  # SP keeps the sequence-sharded GEMM input (re-gathers)
    sp_shards_checkpoint: bool       # full recompute keeps the sequence-sharded block input
    tp_bwd_overlaps_wgrad: bool      # backward TP collectives hidden behind weight gradients
    tp_bwd_all_reduces_each_colwise: bool  # DTensor: one all-reduce per column-parallel input
    dp_overlaps_compute: bool        # DDP bucket / FSDP2 prefetch overlap data-parallel comm
    fsdp_groups_per_block: bool      # ZeRO-2/3 gather and reduce every block on its own
    fp16_grads_reduced_in_fp16: bool  # gradient all-reduce in the 16-bit dtype under fp16
    zero1_reduce_scatters: bool      # ZeRO-1 reduce-scatters gradients and all-gathers 16-bit
                                     # params (else all-reduce, then gather fp32 shards)
    host_overhead_per_layer: bool    # profile's measured host time per layer applies
    kernels_from_op_census: bool     # eager PyTorch's kernels op by op (planner/cost/ops.py),
                                     # else Megatron-LM's fused elementwise kernels
    pytorch_pipelining_limits: bool  # PyTorch 2.13's pipelining restrictions apply (rules.py)
    pipelined_fsdp_defers_sync: bool  # under pipelining, ZeRO-2/3 keep parameters unsharded and
                                     # gradients unreduced until the step's last backward
    deepspeed_optimizers: bool = False  # model states and buffers of DeepSpeed's ZeRO / BF16 /
                                     # FP16 optimizers (planner/cost/deepspeed.py)
    grads_in_model_dtype: bool = False  # gradients accumulated and reduced in bf16/fp16 too
    zero2_params_replicated: bool = False  # ZeRO-2 keeps whole 16-bit parameters: one
                                     # all-gather per step, after the update (not per micro-batch)
    dp_overlap_stages: tuple = ZERO_STAGES  # ZeRO stages whose data-parallel traffic overlaps
                                     # backward (where dp_overlaps_compute)
    pipeline_overlaps_dp: bool = True  # ... also under pipelining
    pipeline_zero_stages: tuple = ZERO_STAGES  # ZeRO stages it runs with pp > 1
    tp_only_autotp: bool = False     # tensor parallelism only as DeepSpeed AutoTP: no pipeline,
                                     # no sequence parallelism
    compiles_blocks: bool = False    # runs Layout.compile: torch.compile of each block
    recompute_policies: tuple = RECOMPUTE  # the recompute policies it runs
    recompute_every_block_only: bool = False  # recompute_every must be 1
    recompute_stops_early: bool = False  # a recompute stops after the last tensor backward needs
    cp_comms: tuple = ()             # context-parallel flavours it runs (plan.CP_COMMS); () none
    cp_refusal: str = ""             # why it runs no context parallelism (cp_comms empty)
    cp_flavour_note: str = ""        # why it lacks the flavours it lacks
    runs_runtime_model: bool = True  # trains runtime/model.py (planner/runtime_support.py)
    expert_parallel: bool = False    # splits routed experts over an ep group (Layout.ep)
    expert_tensor_parallel: bool = False  # splits each expert's FFN over etp (Layout.etp)
    ep_within_dp: bool = False       # ep groups are slices of the data-parallel group
    hsdp_stages: tuple = ()          # ZeRO stages it runs hybrid-sharded (Layout.dp_shard < dp)
    hsdp_note: str = "this engine has no hybrid sharding"  # why other stages are refused
    offload_stages: tuple = ((), ())  # ZeRO stages it runs offload "optimizer", "params" at
    offload_note: str = ""           # what it offloads, and how
    fp8_recipes: tuple = ()          # FP8 recipes it trains with (planner/job.py FP8_RECIPES)
    fp8_refusal: str = ""            # why it has none, where fp8_recipes is empty
    fp8_with_tp: bool = True         # FP8 linears under tensor parallelism

    def optimizer_state_bytes(self, precision: str, zero_stage: int = 0) -> int:
        """AdamW bytes per parameter besides weights and gradients: fp32 moments (8), plus an
        fp32 master copy (4) where the weights are 16-bit (Rajbhandari et al. 2020, Sec. 3.1).
        DeepSpeed's ZeRO optimizers clone an fp32 master partition in every precision
        (stage_1_and_2.py `weights_partition = ....clone().to(master dtype)`)."""
        if self.deepspeed_optimizers and zero_stage >= 1:
            return ADAM_STATE_BYTES_MIXED
        if self.fp32_master_params or precision == "fp32":
            return ADAM_STATE_BYTES_FP32
        return ADAM_STATE_BYTES_MIXED


TORCH = Engine(
    name="torch", schedules=SCHEDULES, zero_stages=ZERO_STAGES, fp32_master_params=True,
    sp_saves_sharded_gemm_input=False, sp_shards_checkpoint=True, tp_bwd_overlaps_wgrad=False,
    tp_bwd_all_reduces_each_colwise=True, dp_overlaps_compute=True, fsdp_groups_per_block=True,
    fp16_grads_reduced_in_fp16=False, zero1_reduce_scatters=False, host_overhead_per_layer=True,
    kernels_from_op_census=True, pytorch_pipelining_limits=True, pipelined_fsdp_defers_sync=True,
    compiles_blocks=True,
    # runtime/context.py implements the all-gather of K/V (PyTorch's context_parallel does not
    # run on CPU SDPA: README, Long sequences)
    cp_comms=("allgather",),
    cp_flavour_note="the runtime (runtime/context.py) implements the all-gather of K/V only",
    # torch.utils.checkpoint (non-reentrant) early stop: the block's last collective, after the
    # last tensor its backward needs, is not re-run (tests/test_tp_census.py)
    recompute_stops_early=True,
    # expert parallelism over the data-parallel group (all_to_all_single), experts whole
    expert_parallel=True, ep_within_dp=True,
    # FSDP2 fully_shard(mesh=2-D (replicate, shard) DeviceMesh) is HSDP; ZeRO-1 is DDP plus
    # ZeroRedundancyOptimizer (or runtime/zero1.py under TP), which take one group only
    hsdp_stages=(2, 3),
    hsdp_note="the torch engine hybrid-shards with FSDP2 on a 2-D mesh (ZeRO-2 or 3); its "
              "ZeRO-1 optimizer shards over one group only",
    # FSDP2 CPUOffloadPolicy moves parameters, gradients and optimizer states together
    offload_stages=((), (2, 3)),
    offload_note="the torch engine offloads with FSDP2's CPUOffloadPolicy, which moves "
                 "parameters, gradients and optimizer states together: offload params at "
                 "ZeRO-2 or 3",
    # torchao float8 training (torchao/float8/config.py): dynamic tensorwise and rowwise
    # scaling; its delayed scaling was removed (torchao 0.10 release notes), so not delayed
    fp8_recipes=("tensorwise", "rowwise"),
    # runtime/fp8.py converts the linears with convert_to_float8_training but does not wire
    # torchao's Float8ColwiseParallel / Float8RowwiseParallel TP plans
    fp8_with_tp=False)

# Megatron-LM runs 1F1B with or without interleaving (no GPipe, no zero-bubble schedules) and
# ZeRO 0 or 1 (--use-distributed-optimizer); its gradient all-reduce is not overlapped
# (Korthikanti et al. 2022, Sec. 6.3); LinearWithGradAccumulationAndAsyncCommunication overlaps
# backward TP communication with the weight-gradient GEMM (Sec. 4.2.2).
MEGATRON = Engine(
    name="megatron", schedules=("1f1b", "interleaved_1f1b"), zero_stages=(0, 1),
    fp32_master_params=False, sp_saves_sharded_gemm_input=True, sp_shards_checkpoint=False,
    tp_bwd_overlaps_wgrad=True, tp_bwd_all_reduces_each_colwise=False, dp_overlaps_compute=False,
    fsdp_groups_per_block=False, fp16_grads_reduced_in_fp16=True, zero1_reduce_scatters=True,
    host_overhead_per_layer=False, kernels_from_op_census=False, pytorch_pipelining_limits=False,
    pipelined_fsdp_defers_sync=False,
    # --recompute-granularity selective|full; no op-level policy, and --recompute-method block
    # counts the first N layers of each stage, not every K-th block
    recompute_policies=("none", "selective", "full"), recompute_every_block_only=True,
    # --context-parallel-size with --cp-comm-type allgather | p2p (ring) | a2a (Megatron-LM
    # megatron/training/arguments.py; transformer_engine's attention implements the three)
    cp_comms=("allgather", "ring", "a2a"),
    # Megatron-Core builds its own model; --expert-model-parallel-size and
    # --expert-tensor-parallel-size (megatron/core/transformer/moe/)
    runs_runtime_model=False, expert_parallel=True, expert_tensor_parallel=True,
    # --num-distributed-optimizer-instances = dp / dp_shard: the distributed optimizer shards
    # within each instance, gradients all-reduce across them (megatron/core/parallel_state.py
    # intra-partial data-parallel groups; megatron-core 0.16)
    hsdp_stages=(1,),
    hsdp_note="Megatron-LM hybrid-shards the distributed optimizer "
              "(--num-distributed-optimizer-instances, ZeRO-1) only",
    # --optimizer-cpu-offload needs --use-distributed-optimizer (megatron-core 0.16
    # optimizer_config.py); parameters stay on the GPU
    offload_stages=((1,), ()),
    offload_note="Megatron-LM offloads the distributed optimizer (--optimizer-cpu-offload, "
                 "ZeRO-1) only",
    # Transformer Engine under megatron-core 0.16 (transformer_config.py fp8_recipe: delayed,
    # tensorwise = TE Float8CurrentScaling, mxfp8, blockwise); no torchao-style rowwise
    fp8_recipes=("delayed", "tensorwise"))

# DeepSpeed 0.19.8 (runtime/engine.py, zero/stage_1_and_2.py, zero/stage3.py, bf16_optimizer.py,
# pipe/engine.py): the user's eager model, so eager kernels and host time; its PipelineEngine
# runs TrainSchedule (1F1B, one stage per rank) and asserts "ZeRO-2 and ZeRO-3 are incompatible
# with pipeline parallelism"; ZeRO-1/2 reduce gradients to their partition owners and all-gather
# 16-bit parameters after the step; overlap_comm overlaps the reduction with backward at ZeRO
# 1-3, while ZeRO-0 and the pipeline engine all-reduce after the last backward (engine.py
# allreduce_gradients, pipe ReduceGrads); gradients stay in the model dtype
# (communication_data_type and grad_accum_dtype default to it); tensor parallelism is AutoTP's
# (LinearLayer all-reduces each column-parallel input gradient, no sequence parallelism).
DEEPSPEED = Engine(
    name="deepspeed", schedules=("1f1b",), zero_stages=ZERO_STAGES, fp32_master_params=False,
    sp_saves_sharded_gemm_input=False, sp_shards_checkpoint=True, tp_bwd_overlaps_wgrad=False,
    tp_bwd_all_reduces_each_colwise=True, dp_overlaps_compute=True, fsdp_groups_per_block=True,
    fp16_grads_reduced_in_fp16=True, zero1_reduce_scatters=True, host_overhead_per_layer=True,
    kernels_from_op_census=True, pytorch_pipelining_limits=False,
    pipelined_fsdp_defers_sync=False, deepspeed_optimizers=True, grads_in_model_dtype=True,
    zero2_params_replicated=True, dp_overlap_stages=(1, 2, 3), pipeline_overlaps_dp=False,
    pipeline_zero_stages=(0, 1), tp_only_autotp=True,
    cp_refusal="DeepSpeed's sequence parallelism (Ulysses, sequence_parallel_size) needs the "
               "model's attention wrapped in its DistributedAttention, which a plain model "
               "and this export do not do; plan it with --engine megatron or torch",
    hsdp_note="DeepSpeed 0.19.8 removed MiCS (mics_shard_size), and ZeRO++ hpZ "
              "(zero_hpz_partition_size) keeps optimizer states and gradients sharded over "
              "all of dp (only a secondary weight copy is node-local): no hybrid sharding",
    # zero_optimization.offload_optimizer at stages 1-3, offload_param at stage 3 only
    # (deepspeed/runtime/zero/offload_config.py, stage3.py)
    offload_stages=((1, 2, 3), (3,)),
    offload_note="DeepSpeed offloads the optimizer at ZeRO-1 to 3 (offload_optimizer) and "
                 "parameters at ZeRO-3 only (offload_param)",
    fp8_refusal="DeepSpeed 0.19.8 has no FP8 training of its own (no fp8 section in its "
    "config; FP8 comes only from Transformer Engine layers inside the model): plan FP8 with "
    "--engine megatron or torch")

ENGINES = {e.name: e for e in (TORCH, MEGATRON, DEEPSPEED)}


def engine(name: str) -> Engine:
    return ENGINES[name]


def dp_overlapped(engine_name: str, zero_stage, pp, dp):
    """Whether data-parallel traffic overlaps compute (planner/cost/combine.dp_exposed); works on
    scalars and numpy columns."""
    import numpy as np
    eng = engine(engine_name)
    return (np.asarray(eng.dp_overlaps_compute) & np.isin(zero_stage, eng.dp_overlap_stages)
            & (np.asarray(eng.pipeline_overlaps_dp) | (np.asarray(pp) == 1))
            & (np.asarray(dp) > 1))


def deferred_fsdp(engine_name: str, zero_stage, pp):
    """ZeRO-2/3 under pipelining in PyTorch 2.13: torch.distributed.pipelining (stage.py,
    backward_maybe_with_nosync) turns off FSDP2's reshard-after-backward and gradient sync for
    every backward, and perform_reduce_grad reduce-scatters once per step after the last one.
    So a stage holds its parameters unsharded and its fp32 gradients unreduced (measured on 4
    gloo ranks, dp=2 x pp=2: the whole stage's parameters and gradients, unsharded); works on
    scalars and numpy columns."""
    import numpy as np  # the light commands (models, profiles, --help) never load numpy
    return (np.asarray(engine(engine_name).pipelined_fsdp_defers_sync)
            & np.isin(zero_stage, SHARDED_GRAD_STAGES) & (np.asarray(pp) > 1))
