"""The compiled census (planner/cost/compiled_census_data.py) is what Inductor generates for the
runtime's block: recompiled it is unchanged, its formulas give the kernels and bytes Inductor
generates at another shape and TP degree exactly, and the compiled block's cost follows from it
(fewer kernels than eager, fewer forward bytes, less time; the same GEMMs and attention)."""

import dataclasses
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

from planner.cost import compiled, compiled_census_data, op_census_data, ops
from planner.cost.compute import layer_times
from planner.hardware import load_profile
from planner.job import Job
from planner.presets import MODEL_PRESETS

torch = pytest.importorskip("torch")
cc = pytest.importorskip("tests.compiled_census")

# Inductor on CPU takes ~20-40 s a variant: two variants cover both families of fusions
# (llama: RMSNorm, RoPE, SwiGLU, residual dropout in 16-bit; gpt: LayerNorm, biases, GELU,
# fp32); `python -m tests.compiled_census` rechecks all of them.
RECHECKED = ("llama/bias=0/dropout=1/16", "gpt/bias=1/dropout=0/32")


@pytest.fixture(scope="module")
def inductor():
    """Inductor runs in a spawned process: once it has started its compile workers in the pytest
    process, the runtime tests' forked ranks inherit a dead worker pool and hang."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda fn, *args, **kwargs: pool.submit(fn, *args, **kwargs).result()


def test_recorded_compiled_census_is_what_inductor_generates(inductor):
    """Fails when runtime/model.py (or PyTorch's compiler) generates other kernels than
    recorded: re-record with `python -m tests.compiled_census --write`, look at what moved."""
    counted = inductor(cc.census, RECHECKED)
    for key in RECHECKED:
        assert counted["variants"][key] == compiled_census_data.CENSUS["variants"][key], \
            f"{key} changed: python -m tests.compiled_census --write"
    assert counted["torch_version"] == compiled_census_data.CENSUS["torch_version"]


def test_every_eager_variant_has_a_compiled_census():
    assert set(compiled_census_data.CENSUS["variants"]) == \
        set(op_census_data.CENSUS["variants"])


@pytest.mark.parametrize("key", sorted(op_census_data.CENSUS["variants"]))
def test_compiled_block_runs_the_eager_gemms_and_attention(key):
    """Inductor fuses nothing into the mm and attention calls: as many as eager issues."""
    for direction in ("fwd", "bwd"):
        eager = op_census_data.CENSUS["variants"][key][f"block_{direction}"]
        fields = op_census_data.CENSUS["fields"]
        rows = compiled_census_data.CENSUS["variants"][key][f"block_{direction}"]
        for kind in ("gemm", "attention"):
            count = sum(r[fields.index("n")] for r in eager if r[fields.index("kind")] == kind)
            got = sum(r[2] for r in rows if r[0] == kind)
            assert got == count, (key, direction, kind)


def test_formulas_give_inductors_kernels_at_another_shape(inductor):
    """The tiny llama at TP=2, micro-batch 2 x 12 tokens: each pass's memory-bound kernels and
    their bytes equal what Inductor generates for that block."""
    spec = dataclasses.replace(MODEL_PRESETS["tiny"], max_seq_len=32, dropout=0.1)
    got = inductor(cc.compile_block, spec, "16", t=2, batch=(2, 12), raw=True)
    for direction in ("fwd", "bwd"):
        rows = got[f"block_{direction}"]
        nbytes = sum(n * (read + write) for kind, _, n, read, write in rows
                     if kind in compiled.MEMORY_KINDS)
        kernels = sum(n for kind, _, n, _, _ in rows if kind in compiled.MEMORY_KINDS)
        want = compiled.compiled_pass(spec, "bf16", direction, tp=2, micro_batch=2, seq_len=12)
        assert want.memory_kernels == kernels, direction
        assert want.memory_bytes == pytest.approx(nbytes, rel=1e-12), direction
    saving = compiled.saved_bytes_saving(spec, "bf16", tp=2, micro_batch=2, seq_len=12)
    assert saving == pytest.approx(got["saved_eager"] - got["saved_compiled"], rel=1e-12)


SHAPES = [(MODEL_PRESETS["llama3-8b"], "h100-80g", 1, 1, 8192),
          (MODEL_PRESETS["llama3-8b"], "a100-80g", 4, 2, 4096),
          (MODEL_PRESETS["gpt2-124m"], "a100-80g", 1, 8, 1024),
          (MODEL_PRESETS["tiny"], "cpu", 1, 2, 256)]


@pytest.mark.parametrize("spec,profile,tp,mb,seq", SHAPES)
def test_compiled_layer_is_faster_with_fewer_kernels_and_bytes(spec, profile, tp, mb, seq):
    gpu = load_profile(profile).gpu
    job = Job(global_batch=64, seq_len=seq, precision="bf16")
    shape = {"tp": tp, "sequence_parallel": False, "micro_batch": mb}
    eager = layer_times(gpu, spec, job, **shape)
    comp = layer_times(gpu, spec, job, **shape, compile=True)
    assert comp.fwd_s < eager.fwd_s and comp.bwd_s < eager.bwd_s
    assert comp.elementwise_fwd_s < eager.elementwise_fwd_s
    assert comp.elementwise_bwd_s < eager.elementwise_bwd_s
    assert (comp.gemm_fwd_s, comp.attention_fwd_s, comp.gemm_bwd_s) == \
        (eager.gemm_fwd_s, eager.attention_fwd_s, eager.gemm_bwd_s)
    census = {"tp": tp, "micro_batch": mb, "seq_len": seq}
    for direction in ("fwd", "bwd"):
        fused = compiled.compiled_pass(spec, "bf16", direction, **census)
        assert fused.kernels < compiled.eager_kernels(spec, "bf16", direction, **census)
    # forward traffic falls everywhere; backward traffic not for LayerNorm and biases: Inductor
    # computes their weight and bias gradients as column reductions re-reading the activations
    # (eager's native_layer_norm_backward reads them once), so only its kernel count falls
    eager_fwd = sum(o.count * (o.read_bytes + o.write_bytes)
                    for o in ops.ops(spec, "bf16", "block", "fwd", **census) if o.kind == "memory")
    assert compiled.compiled_pass(spec, "bf16", "fwd", **census).memory_bytes < eager_fwd
