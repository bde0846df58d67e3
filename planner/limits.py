"""Physical and enumeration bounds that every loader enforces (model spec, job, hardware profile,
cluster, command-line flags), in one place.

A number outside its range is a user error: a ValueError naming the key, the value and the range.
It is either physically impossible (zero bandwidth, an efficiency above 1, a GPU with 1 byte of
memory) or so large that the planner's enumeration or arithmetic would not finish (10^9 layers,
2^31 GPUs per node).  Every bound is generous: at least an order of magnitude beyond the largest
published system or model, so no real input is refused."""

import math

# --- cluster --------------------------------------------------------------------------------
# Largest announced training clusters hold ~10^5 GPUs (Meta 2024: 2 x 24,576 H100; xAI Colossus
# 2024: 100,000 H100).  2^20 also bounds the search's dp x tp x pp enumeration.
MAX_GPUS = 2**20
MAX_NODES = MAX_GPUS
# GPUs on one intra-node fabric: 8 (DGX), 72 (GB200 NVL72), 576 (NVIDIA's NVL576 roadmap).
MAX_GPUS_PER_NODE = 1024
# Parallel degrees and virtual pipeline stages cannot exceed the GPUs / the layers.
MAX_DEGREE = MAX_GPUS
# A hybrid cube-mesh NVLink node (DGX-1: 8 V100, 6 links each) is searched for NCCL rings by
# enumerating Hamiltonian cycles, (n-1)!/2 of them: 8 GPUs = 2,520.  Larger NVLink nodes use
# NVSwitch.  18 links per GPU is the most of any NVLink generation (H100, NVLink 4).
MAX_MESH_GPUS = 8
MAX_NVLINKS_PER_GPU = 18

# --- model shape ----------------------------------------------------------------------------
# Largest published: 126 layers, hidden 16,384, 128 heads, FFN 53,248 (Llama 3 405B, Dubey et al.
# 2024, Table 3); hidden 18,432 and FFN 73,728 (PaLM 540B, Chowdhery et al. 2022, Table 1);
# vocabulary 256k (PaLM; Gemma 2024).
MAX_LAYERS = 10_000
MAX_HIDDEN_SIZE = 2**20
MAX_FFN_HIDDEN_SIZE = 2**22
MAX_HEADS = 2**16
MAX_VOCAB_SIZE = 2**24
# Context: 10M tokens (Gemini 1.5, Reid et al. 2024); 2^24 = 16.8M.
MAX_SEQ_LEN = 2**24
MAX_ROPE_THETA = 1e12       # Llama 3: 5e5; long-context variants use up to ~1e9

# --- job ------------------------------------------------------------------------------------
# Sequences per step: GPT-3 1,536 (Brown et al. 2020, Table 2.1); BERT with LAMB 65,536 (You et
# al. 2020).  2^24 leaves two orders of magnitude.
MAX_GLOBAL_BATCH = 2**24
MAX_TOKEN_BUDGET = 1e18         # tokens to train: Llama 3 used 1.5e13 (Dubey et al. 2024)
MAX_TOKENS_PER_S = 1e15         # a whole cluster's training throughput target
MAX_RANKED_PLANS = 1000         # `suggest --top/--rank`: each ranked plan is estimated again

# --- hardware profile -----------------------------------------------------------------------
# Bytes/s of any link or memory: HBM3e ~8e12 (B200), NVLink 5 1.8e12 per GPU; 1e15 (1 PB/s) is
# far above both.  1e3 (1 kB/s) is far below any real link and keeps divisions finite.
MIN_BANDWIDTH = 1e3
MAX_BANDWIDTH = 1e15
# Seconds of a link's latency or a kernel's fixed cost: 0 (folded elsewhere) .. 10 s.
MAX_LATENCY_S = 10.0
# Host seconds per layer and micro-batch (planner profile on CPU ranks measures ~0.05 s).
MAX_HOST_LAYER_S = 1e3
# Memory per device: 1 MiB .. 16 TiB.  GPUs: 288 GB at most (B300); CPU ranks of `planner
# profile --ranks 1` see the host's RAM (8-socket servers reach ~16 TiB).
MIN_MEMORY_BYTES = 2**20
MAX_MEMORY_BYTES = 2**44
# Dense FLOP/s of one device: 1e6 .. 1e18 (B200 dense FP4 ~9e15).
MIN_FLOPS = 1e6
MAX_FLOPS = 1e18
# GEMM efficiency half dimension d in d / (d + half_dim): 128 on A100/H100; 0..1e6.
MAX_GEMM_HALF_DIM = 1e6
MAX_SHARED_CORES = 2**16

# --- measured and fitted terms (planner profile, planner calibrate) --------------------------
# A fitted term outside its plausible range is refused (exit 2), not written: these are much
# narrower than the loader's bounds above, which only keep the arithmetic finite.  Each is
# (lo, hi).  gemm_efficiency_max: cuBLAS sustains 0.7-0.85 of the dense peak on V100/A100/H100
# (shipped profiles: 0.72-0.80); below 0.05 the peak or dtype is wrong.
PLAUSIBLE_GEMM_EFFICIENCY = (0.05, 1.0)
# gemm_half_dim: 128 = the Hopper/Ampere bf16 tile (shipped GPU profiles), 62 on this CPU; at
# 1024 a 1024^3 GEMM would reach 1/8 of e_max, while cuBLAS runs it at >30% of peak on A100
# (NVIDIA Matrix Multiplication Background guide, fig. 2).  A loaded host once fitted 4011.
PLAUSIBLE_GEMM_HALF_DIM = (0.0, 1024.0)
# Measured dense FLOP/s of one rank: a CPU process sharing a core (~1e9) .. B200 dense FP4 9e15.
PLAUSIBLE_RANK_FLOPS = (1e8, 1e16)
# Copy bandwidth of one rank: one DDR4 channel (25.6 GB/s) shared by 100+ ranks .. HBM3e 8e12.
PLAUSIBLE_COPY_BYTES_PER_S = (1e8, 2e13)
# All-reduce bus bandwidth: gloo on loopback 7e8 (this host, 8 ranks) .. NVLink 5 1.8e12.
PLAUSIBLE_COLLECTIVE_BYTES_PER_S = (1e6, 1e13)
# Latency per hop: NCCL over NVLink ~8e-6 (shipped GPU profiles); gloo, 8 processes on 2 cores,
# 1.3e-3 (the shipped cpu profile); 2e-2 is 15 times that.
PLAUSIBLE_HOP_LATENCY_S = (0.0, 2e-2)
# Host time of the probe layer (hidden 64, 16 tokens) per pass: 3e-3 plain, 4.6e-2 at TP=8 with
# 8 ranks on 2 cores (shipped cpu profile); 1 s is 20 times the worst.
PLAUSIBLE_PROBE_LAYER_S = (1e-6, 1.0)
# Fit quality, rms of (fitted - measured) / measured: refused above REFUSE, a warning above WARN.
# The shipped cpu profile's GEMM fit: 13%.  Repeats whose (max - min) / median exceeds
# MAX_REPEAT_SPREAD are flagged: on an idle host they agree within a few percent.
WARN_FIT_RMS = 0.2
REFUSE_FIT_RMS = 0.4
MAX_REPEAT_SPREAD = 0.2
# Machine load (planner profile refuses a busy host: CPU step-time predictions from a profile
# taken while other work ran were +94% to +353% off).  An idle Linux host's 1-minute load average
# is 0.0-0.3, so other work may hold at most half a core of the cores the profile uses; a
# CPU-bound process on a free core gets >= 0.95 of it (kernel threads, interrupts), so a share
# below 0.85 means other runnable work on those cores.
MAX_OTHER_LOAD_CORES = 0.5
MIN_CORE_SHARE = 0.85
# planner calibrate: factors on the profile's values.  Efficiency: 1/20 .. 2 of the profile's
# (a profile measured on the machine is rarely off by more); fixed overheads and latencies:
# two orders of magnitude either way.  A parameter the runs are insensitive to (doubling it
# changes no prediction by MIN_SENSITIVITY in log step time, ~1.4%) is left at 1.  After the
# fit, a mean |error| above MAX_CALIBRATED_ERROR, or a factor at its bound, is refused.
CALIBRATION_FACTOR_BOUNDS = {"efficiency": (0.05, 2.0), "overhead": (0.01, 100.0),
                             "latency": (0.01, 100.0)}
MIN_SENSITIVITY = 0.02
MAX_CALIBRATED_ERROR = 1.0

# --- search ---------------------------------------------------------------------------------
# The 1T-parameter GPT on 3,072 GPUs enumerates 81,468 layouts in ~0.3 s (benchmarks/
# search_speed.py); 10^6 is 12 times that (a few seconds, ~100 MB of columns).  --allow-fewer-gpus
# searches every whole-node count: 256 of them covers 2,048 GPUs of DGX nodes.
MAX_SEARCH_LAYOUTS = 1_000_000
MAX_GPU_COUNTS = 256

# --- simulation -----------------------------------------------------------------------------
# `planner simulate` builds about 4 events per micro-batch and model chunk (forward, backward,
# sends); 2^14 micro-batch x chunk passes is ~60k events, a few seconds on one core.  Larger
# iterations are estimated (closed form) but not drawn.
MAX_SIM_PASSES = 2**14

# --- input files ----------------------------------------------------------------------------
# A plan, spec, profile or measured.json is a few kB to a few MB; deeper than 64 levels of
# nesting is never one of ours (and Python's recursion stops near 1,000).
MAX_JSON_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 64


def _show(value) -> str:
    """A number as it can be printed in one short line (huge integers by their size)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return f"about 10^{int(value.bit_length() * math.log10(2))}"
    if isinstance(value, float):
        text = f"{value:g}"
        return text if any(c in text for c in ".en") else text + ".0"  # 2.0, not 2
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_range(value, key: str, lo, hi, lo_open: bool = False):
    """`value` as given when it is a finite number in [lo, hi] ((lo, hi] with lo_open), else a
    ValueError naming key, value and the allowed range.  Booleans and strings are refused."""
    if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{key} must be a finite number in {_range(lo, hi, lo_open)}, "
                         f"got {_show(value)}")
    if value < lo or value > hi or (lo_open and value == lo):
        raise ValueError(f"{key} must be in {_range(lo, hi, lo_open)}, got {_show(value)}")
    return value


def check_int(value, key: str, lo: int, hi: int) -> int:
    """`value` when it is an integer (not a bool) in [lo, hi], else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer in {_range(lo, hi, False)}, "
                         f"got {_show(value)}")
    return check_range(value, key, lo, hi)


def _range(lo, hi, lo_open: bool) -> str:
    return f"{'(' if lo_open else '['}{_show(lo)}, {_show(hi)}]"
