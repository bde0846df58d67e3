"""The op census (planner/cost/op_census_data.py) is what the runtime's model issues: recounted
with torch (tests/op_census.py) it is unchanged, its formulas give the ops of the runtime's own
modules at other shapes and TP degrees exactly, and the torch engine's kernel times are the sum
of its ops."""

import dataclasses
from collections import defaultdict

import pytest

from planner.cost import op_census_data, ops
from planner.cost.compute import gemm_time, head_times, layer_times
from planner.cost.flops import Gemm
from planner.hardware import load_cluster, load_profile
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS
from planner.spec import ModelSpec

torch = pytest.importorskip("torch")
oc = pytest.importorskip("tests.op_census")

BERT = ModelSpec(name="tiny-bert", arch="bert", num_layers=1, hidden_size=64, num_heads=4,
                 num_kv_heads=4, ffn_hidden_size=256, vocab_size=96, max_seq_len=32,
                 tie_embeddings=True, linear_bias=True, dropout=0.1)
SPECS = {"llama": dataclasses.replace(MODEL_PRESETS["tiny"], max_seq_len=32),
         "gpt": dataclasses.replace(MODEL_PRESETS["tiny-gpt"], max_seq_len=32, dropout=0.1),
         "llama-bias": dataclasses.replace(MODEL_PRESETS["tiny"], max_seq_len=32,
                                           linear_bias=True, dropout=0.1),
         "bert": BERT}
BATCH = (2, 12)
PRECISION = {"bf16": "16", "fp32": "32"}


def test_recorded_census_is_the_runtimes():
    """Fails when runtime/model.py (or PyTorch) issues other ops than recorded: re-record with
    `python -m tests.op_census --write` and look at what moved."""
    counted = oc.census()
    for key, parts in counted["variants"].items():
        for part, rows in parts.items():
            assert [oc._row(o) for o in rows] == op_census_data.CENSUS["variants"][key][part], \
                f"{key} {part} changed: python -m tests.op_census --write"
    assert counted["optimizer"] == op_census_data.CENSUS["optimizer"]
    assert oc.render(counted) == oc.DATA.read_text()


def _totals(rows) -> dict:
    """(module, op, kind) -> [count, FLOPs, bytes read, bytes written, sorted GEMM shapes]."""
    out = defaultdict(lambda: [0, 0.0, 0.0, 0.0, []])
    for r in rows:
        t = out[(r["module"], r["op"], r["kind"])]
        t[0] += r["n"]
        t[1] += r["n"] * r["flops"]
        t[2] += r["n"] * r["read"]
        t[3] += r["n"] * r["write"]
        t[4] += [tuple(round(d, 6) for d in r["mkn"])] * r["n"] if "mkn" in r else []
    return {k: v[:4] + [sorted(v[4])] for k, v in out.items()}


def _predicted(spec, precision, region, direction, tp):
    rows = ops.ops(spec, precision, region, direction, tp=tp, micro_batch=BATCH[0],
                   seq_len=BATCH[1])
    return _totals([{"module": o.module, "op": o.name, "kind": o.kind, "n": o.count,
                     "flops": o.flops, "read": o.read_bytes, "write": o.write_bytes,
                     **({"mkn": list(o.mkn)} if o.mkn else {})} for o in rows])


def _modules(spec, tp):
    """The runtime's own modules at tp = 1, one TP rank's shapes otherwise."""
    from runtime.model import Block, Embedding, Head
    if tp == 1:
        return Block(spec), Head(spec), Embedding(spec)
    return oc.local_block(spec, tp), oc.local_head(spec, tp), oc.local_embedding(spec, tp)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(SPECS))
def test_census_formulas_give_the_ops_at_other_shapes(name, tp, precision):
    spec = SPECS[name]
    block, head, emb = _modules(spec, tp)
    p = PRECISION[precision]
    counted = {"block": oc.block_census(spec, p, block=block, batch=BATCH, raw=True),
               "head": oc.head_census(spec, p, head=head, batch=BATCH, raw=True),
               "embedding": oc.embedding_census(spec, p, emb=emb, batch=BATCH, raw=True)}
    for region, passes in counted.items():
        for direction, rows in zip(ops.PASSES, passes):
            want = _totals(rows)
            got = _predicted(spec, precision, region, direction, tp)
            assert got.keys() == want.keys(), (region, direction)
            for key in want:
                assert got[key][:4] == pytest.approx(want[key][:4]), (region, direction, key)
                assert got[key][4] == want[key][4], (region, direction, key)


def test_sequence_parallel_shards_the_norm_and_residual_ops_only():
    spec, kw = MODEL_PRESETS["llama2-7b"], {"tp": 4, "micro_batch": 1, "seq_len": 4096}
    full = ops.ops(spec, "bf16", "block", "fwd", **kw)
    sharded = ops.ops(spec, "bf16", "block", "fwd", sequence_parallel=True, **kw)
    assert {o.module for o in full if o.sequence_parallel} == {"attn_norm", "mlp_norm", "block"}
    for a, b in zip(full, sharded):
        scale = 4 if a.sequence_parallel else 1
        assert a.write_bytes == pytest.approx(scale * b.write_bytes)  # forward: activations
        assert a.flops == b.flops and a.mkn == b.mkn


def test_llama_layer_census_in_numbers():
    """What eager PyTorch runs per Llama-2 7B layer (bf16 autocast, 4096 tokens, one GPU)."""
    s = ops.summary(MODEL_PRESETS["llama2-7b"], "bf16", tp=1, micro_batch=1, seq_len=4096)
    kernels = {k: v[0] for k, v in s.items()}
    assert kernels == {"block_fwd": 51, "block_bwd": 66, "head_fwd": 14, "head_bwd": 19,
                       "embedding_fwd": 2, "embedding_bwd": 2}
    # memory-bound bytes of the forward: 4.1 GB, 4.5x the 0.92 GB the megatron engine charges
    # for its fused kernels (planner.cost.compute._elementwise_bytes)
    assert 4.0e9 < s["block_fwd"][2] < 4.2e9 and 6.4e9 < s["block_bwd"][2] < 6.6e9


def test_optimizer_bytes_per_parameter():
    # fused AdamW: read p, g, m, v and write p, m, v (28 B); foreach: 9 passes (84 B); the
    # global-norm clipping reads the gradients and scales them (4 + 8 B)
    assert ops.optimizer_bytes_per_param(fused=True) == 40
    assert ops.optimizer_bytes_per_param(fused=False) == 96


def _gpu(name="h100-80g"):
    return load_profile(name).gpu


def test_torch_layer_time_is_the_sum_of_its_census_ops():
    gpu, spec = _gpu(), MODEL_PRESETS["llama2-7b"]
    job = Job(global_batch=8, seq_len=4096)
    lt = layer_times(gpu, spec, job, tp=2, sequence_parallel=True, micro_batch=1)
    for direction, gemm_s, elem_s in (("fwd", lt.gemm_fwd_s, lt.elementwise_fwd_s),
                                      ("bwd", lt.gemm_bwd_s, lt.elementwise_bwd_s)):
        rows = ops.ops(spec, "bf16", "block", direction, tp=2, micro_batch=1, seq_len=4096,
                       sequence_parallel=True)
        mem = [o for o in rows if o.kind == "memory"]
        nbytes = sum(o.count * (o.read_bytes + o.write_bytes) for o in mem)
        kernels = sum(o.count for o in mem)
        assert elem_s == pytest.approx(nbytes / (gpu.hbm_bandwidth_bytes_per_s *
                                                 gpu.memory_efficiency)
                                       + kernels * gpu.kernel_overhead_s)
        assert gemm_s == pytest.approx(sum(gemm_time(gpu, Gemm(o.name, *o.mkn, o.count), "bf16")
                                           for o in rows if o.kind == "gemm"))
    assert lt.wgrad_s == pytest.approx(lt.gemm_bwd_s / 2)


def test_megatron_keeps_its_fused_kernels_and_eager_pytorch_moves_more_bytes():
    gpu, spec = _gpu(), MODEL_PRESETS["llama2-7b"]
    torch_job, mega_job = Job(global_batch=8, seq_len=4096), \
        Job(global_batch=8, seq_len=4096, engine="megatron")
    kw = {"tp": 1, "sequence_parallel": False, "micro_batch": 1}
    eager, fused = layer_times(gpu, spec, torch_job, **kw), layer_times(gpu, spec, mega_job, **kw)
    assert eager.gemm_fwd_s == pytest.approx(fused.gemm_fwd_s)  # the same GEMMs
    assert eager.attention_fwd_s == fused.attention_fwd_s
    assert eager.elementwise_fwd_s > 3 * fused.elementwise_fwd_s
    assert eager.elementwise_bwd_s > 3 * fused.elementwise_bwd_s
    assert head_times(gpu, spec, torch_job, tp=1, micro_batch=1).fwd_s > \
        head_times(gpu, spec, mega_job, tp=1, micro_batch=1).fwd_s


ANCHOR_1B = ModelSpec(name="llama-1.1b", arch="llama", num_layers=22, hidden_size=2048,
                      num_heads=32, num_kv_heads=4, ffn_hidden_size=5632, vocab_size=32000,
                      max_seq_len=2048, tie_embeddings=False, linear_bias=False)


@pytest.mark.parametrize("micro_batch,mfu", [(4, 0.378), (8, 0.404)])
def test_eager_single_h100_anchor(micro_batch, mfu):
    """Shared anchors section 6: plain eager PyTorch, 1.1B Llama, seq 2048, one H100, MFU =
    (6N + 12 L h s) tokens / step / 989 TFLOP/s; target within 10% (anchors README).  That
    model fuses q/k/v and gate/up and uses nn.RMSNorm; the census is of runtime/model.py."""
    from planner.cost.estimate import estimate
    from planner.cost.params import count_parameters
    plan = Plan(model=ANCHOR_1B, cluster=load_cluster("h100-80g", 1, num_gpus=1),
                job=Job(global_batch=micro_batch, seq_len=2048),
                layout=Layout(micro_batch=micro_batch))
    tokens = micro_batch * 2048
    flops = (6 * count_parameters(ANCHOR_1B) + 12 * 22 * 2048 * 2048) * tokens
    predicted = flops / estimate(plan).step_s / 989e12
    assert predicted == pytest.approx(mfu, rel=0.10)
