"""The simulator: schedule orders equal PyTorch's, closed-form bubbles and in-flight counts on
uniform stages, agreement with estimate(), and the picture/JSON outputs."""

import json
import math
from types import SimpleNamespace

import networkx as nx
import pytest

from planner.cost.estimate import estimate
from planner.cost.pipeline import inflight_chunks
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS
from planner.sim.schedules import rank_actions
from planner.sim.timeline import (
    SimCosts,
    build_graph,
    plan_costs,
    simulate,
    simulate_costs,
)

SPLIT = ("interleaved_zb", "zbv")


def _inflight(layout, rank):
    return inflight_chunks(pp=layout.pp, num_microbatches=layout.num_microbatches,
                           virtual_stages=layout.virtual_stages, schedule=layout.schedule,
                           rank=rank)


def _uniform(schedule, p, m, v=1, fwd=1.0, bwd=2.0, wgrad=1.0):
    """p*v equal chunks of one rank's F=fwd, B=bwd (W=wgrad), no communication at all."""
    n = p * v
    return SimCosts(schedule=schedule, pp=p, virtual_stages=v, num_microbatches=m,
                    chunk_fwd_s=[fwd / v] * n, chunk_bwd_s=[bwd / v] * n,
                    chunk_wgrad_s=[wgrad / v] * n if schedule in SPLIT else ())


def _plan(model="llama2-7b", gpus=8, batch=None, seq=4096, engine="torch", **layout):
    lay = Layout(**layout)
    job = Job(global_batch=batch or lay.dp * lay.micro_batch * lay.num_microbatches,
              seq_len=seq, engine=engine)
    return Plan(model=MODEL_PRESETS[model], job=job, layout=lay,
                cluster=load_cluster("a100-80g", max(1, gpus // 8), num_gpus=gpus))


# --- must show: closed-form bubbles on uniform stages without communication -------------------

@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 2), (4, 8), (4, 4), (8, 16), (8, 32), (3, 7)])
def test_gpipe_and_1f1b_bubble_is_exact(schedule, p, m):
    t = simulate_costs(_uniform(schedule, p, m))
    assert t.bubble_fraction == (p - 1) / (m + p - 1)
    assert t.step_s == (m + p - 1) * 3.0


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 4, 2), (4, 8, 4), (8, 16, 2),
                                   (8, 8, 3), (4, 12, 3)])
def test_interleaved_bubble_within_rounding(p, m, v):
    t = simulate_costs(_uniform("interleaved_1f1b", p, m, v))
    assert t.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)


@pytest.mark.parametrize("p,m", [(4, 8), (8, 16), (4, 4)])
def test_zero_bubble_h1_removes_two_thirds_of_the_1f1b_bubble(p, m):
    """ZB-H1 with F = B = W (Qi et al. 2023, Sec. 3.1: bubble (p-1)(F+B-W) vs 1F1B's
    (p-1)(F+B+W)): ScheduleInterleavedZeroBubble with one stage per rank."""
    zb = simulate_costs(_uniform("interleaved_zb", p, m, bwd=2.0, wgrad=1.0))
    one = simulate_costs(_uniform("1f1b", p, m))
    assert zb.step_s - 3 * m == pytest.approx((one.step_s - 3 * m) / 3)


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2),
                                        ("interleaved_zb", 1), ("interleaved_zb", 2), ("zbv", 2)])
@pytest.mark.parametrize("p,m", [(8, 6), (4, 1), (3, 5), (1, 3)])
def test_every_schedule_completes_and_keeps_every_rank_busy_for_its_share(schedule, v, p, m):
    if schedule != "gpipe" and schedule != "1f1b" and m % max(1, m // p):
        pytest.skip("PyTorch refuses this micro-batch count")
    t = simulate_costs(_uniform(schedule, p, m, v))
    compute = [e for e in t.events if e.kind in "FBIW"]
    assert len([e for e in compute if e.kind == "F"]) == p * v * m
    assert t.step_s >= 3 * m and t.pipeline_s == t.step_s


# --- must show: peak in-flight micro-batches match the memory model ---------------------------

@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2),
                                        ("interleaved_1f1b", 3), ("zbv", 2)])
@pytest.mark.parametrize("p,m", [(4, 8), (8, 16), (2, 8)])
def test_peak_inflight_matches_memory_model(schedule, v, p, m):
    t = simulate_costs(_uniform(schedule, p, m, v))
    layout = Layout(pp=p, num_microbatches=m, schedule=schedule, virtual_stages=v)
    assert list(t.peak_inflight) == [_inflight(layout, r) for r in range(p)]
    if schedule == "gpipe":
        assert t.peak_inflight[0] == m
    if schedule == "1f1b":
        assert t.peak_inflight[0] == p


def test_interleaved_zb_inflight_matches_the_memory_model():
    """ZB1P warms up one forward per hop, not two (PyTorch _get_warmup_ops multiply_factor=1):
    rank r holds v*p - r chunks, and so does inflight_chunks."""
    p, m, v = 4, 8, 2
    t = simulate_costs(_uniform("interleaved_zb", p, m, v))
    assert list(t.peak_inflight) == [v * p - r for r in range(p)]
    layout = Layout(pp=p, num_microbatches=m, schedule="interleaved_zb", virtual_stages=v)
    assert list(t.peak_inflight) == [_inflight(layout, r) for r in range(p)]


# --- must show: the event order is PyTorch's ---------------------------------------------------

def _fake_stages(p, v, rank, v_shape):
    idx = [rank, 2 * p - 1 - rank] if v_shape else [rank + k * p for k in range(v)]
    return [SimpleNamespace(num_stages=p * v, group_size=p, group_rank=rank, stage_index=i,
                            is_first=i == 0, is_last=i == p * v - 1, submod=None) for i in idx]


class _RecordingStage:
    """Stands in for a PipelineStage: no communication, records the compute calls."""

    def __init__(self, p, rank):
        self.num_stages, self.group_size, self.group_rank = p, p, rank
        self.stage_index, self.is_first, self.is_last, self.log = rank, rank == 0, False, []

    def __getattr__(self, name):
        if name.startswith("get_") and name.endswith("_ops"):
            return lambda *a, **k: []
        raise AttributeError(name)

    def forward_one_chunk(self, mb, *args, **kwargs):
        self.log.append(("F", self.stage_index, mb))

    def backward_one_chunk(self, mb, **kwargs):
        self.log.append(("B", self.stage_index, mb))

    def perform_reduce_grad(self, *args):
        pass


def _executed_single(cls, p, m):
    """Run PyTorch's own _step_microbatches loop on recording stages (its pipeline_order IR
    for Schedule1F1B mislabels the last rank's micro-batches in 2.13; the loop is the truth)."""
    out = []
    for rank in range(p):
        stage = _RecordingStage(p, rank)
        sched = cls(stage, m)
        sched._initialize_stage = lambda *a, **k: None
        sched._check_inputs = lambda args, kwargs, target, losses: (args, kwargs)
        sched._step_microbatches([()] * m, [{}] * m, None, None)
        out.append(stage.log)
    return out


def _runtime_order(cls, p, v, m, v_shape=False):
    """Compute actions of the lowered schedule _PipelineScheduleRuntime.step executes."""
    stages = _fake_stages(p, v, 0, v_shape)
    sched = cls(stages, m)
    return [[(a.computation_type.value, a.stage_index, a.microbatch_index)
             for a in sched.pipeline_order_with_comms[r] if a.computation_type.value in "FBIW"]
            for r in range(p)]


@pytest.mark.parametrize("p,m", [(1, 4), (2, 4), (4, 4), (4, 8), (8, 12)])
def test_single_stage_orders_match_pytorch(p, m):
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    assert rank_actions("gpipe", p, 1, m) == _executed_single(schedules.ScheduleGPipe, p, m)
    assert rank_actions("1f1b", p, 1, m) == _executed_single(schedules.Schedule1F1B, p, m)


@pytest.mark.parametrize("schedule,v", [("interleaved_1f1b", 2), ("interleaved_1f1b", 3),
                                        ("interleaved_zb", 1), ("interleaved_zb", 2),
                                        ("zbv", 2)])
@pytest.mark.parametrize("p,m", [(2, 4), (4, 4), (4, 8), (4, 12), (8, 16), (3, 3), (8, 6)])
def test_multi_stage_orders_match_pytorch(schedule, v, p, m):
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    cls = {"interleaved_1f1b": schedules.ScheduleInterleaved1F1B,
           "interleaved_zb": schedules.ScheduleInterleavedZeroBubble,
           "zbv": schedules.ScheduleZBVZeroBubble}[schedule]
    assert rank_actions(schedule, p, v, m) == _runtime_order(cls, p, v, m, schedule == "zbv")


def test_simulated_compute_order_is_the_schedule_order():
    t = simulate_costs(_uniform("interleaved_1f1b", 4, 8, 2))
    for r in range(4):
        done = sorted((e for e in t.events if e.rank == r and e.kind in "FB"),
                      key=lambda e: e.start_s)
        expected = rank_actions("interleaved_1f1b", 4, 2, 8)[r]
        assert [(e.kind, e.stage, e.mb) for e in done] == expected


# --- agreement with the closed-form estimate ---------------------------------------------------

# (plan kwargs, relative tolerance).  2%: both model the same events; the simulator sends in one
# direction at the pipeline ends and bounds the bubble by the real schedule.  zbv 5%: the closed
# form's zero-bubble fill (p-1)(F+B-2W)/(F+B)/v is conservative for the V schedule: with the
# torch engine's eager backward (more of it not deferrable) the closed form's bubble is 9.3% of
# the step where PyTorch's ZB-V order, simulated, idles 3.7% (the V placement turns the loss
# around on one rank), so the estimate is 6.3% slower: a known gap, marked below.
ZBV_GAP = pytest.mark.xfail(strict=True, reason="closed-form ZB-V bubble 9.3% vs simulated 3.7%")
AGREEMENT = [
    (dict(pp=4, dp=2, num_microbatches=8), 0.02),
    (dict(pp=8, num_microbatches=16), 0.02),
    (dict(pp=8, num_microbatches=8, schedule="gpipe"), 0.02),
    (dict(pp=4, tp=2, num_microbatches=8, schedule="interleaved_1f1b", virtual_stages=2,
          sequence_parallel=True), 0.02),
    (dict(pp=2, tp=4, num_microbatches=8, recompute="full"), 0.02),
    (dict(pp=4, dp=2, zero_stage=1, num_microbatches=8, recompute="selective"), 0.02),
    (dict(pp=2, dp=4, zero_stage=2, num_microbatches=8), 0.02),
    pytest.param(dict(pp=8, num_microbatches=16, schedule="zbv", virtual_stages=2), 0.05,
                 marks=ZBV_GAP),
    (dict(pp=4, dp=2, num_microbatches=8, engine="megatron"), 0.02),
    (dict(pp=1, dp=8, zero_stage=3, num_microbatches=4), 0.02),
    (dict(pp=8, num_microbatches=8, schedule="interleaved_1f1b", virtual_stages=4), 0.02),
]


@pytest.mark.parametrize("layout,tol", AGREEMENT)
def test_step_time_agrees_with_estimate(layout, tol):
    plan = _plan(**layout)
    assert simulate(plan).step_s == pytest.approx(estimate(plan).time.step_s, rel=tol)


def test_1t_plan_agrees_with_estimate():
    """The 1T configuration of Korthikanti et al. 2022 (Table 3) with 64 micro-batches."""
    from golden_helpers import megatron_gpt
    job = Job(global_batch=64, seq_len=2048, attention="fused", engine="megatron")
    lay = Layout(tp=8, pp=64, sequence_parallel=True, num_microbatches=64,
                 recompute="selective", schedule="interleaved_1f1b", virtual_stages=2)
    plan = Plan(model=megatron_gpt("1T", 160, 25600, 128), job=job, layout=lay,
                cluster=load_cluster("a100-80g", 64))
    t = simulate(plan)
    assert t.step_s == pytest.approx(estimate(plan).time.step_s, rel=0.01)
    assert len(t.events) > 30000


# --- results ----------------------------------------------------------------------------------

def test_graph_is_a_dag_with_every_event():
    c = _uniform("1f1b", 4, 8)
    g = build_graph(c)
    assert nx.is_directed_acyclic_graph(g)
    kinds = [a["kind"] for _, a in g.nodes(data=True)]
    assert kinds.count("F") == kinds.count("B") == 4 * 8 and kinds.count("optimizer") == 4


def test_dp_gradient_buckets_overlap_the_last_backward():
    plan = _plan(pp=2, dp=4, num_microbatches=8)
    t = simulate(plan)
    grad = t.comm["dp_grad"]
    assert grad.overlapped_s > 0 and grad.exposed_s >= 0
    assert grad.total_s == pytest.approx(grad.exposed_s + grad.overlapped_s)
    megatron = simulate(_plan(pp=2, dp=4, num_microbatches=8, engine="megatron"))
    assert megatron.comm["dp_grad"].overlapped_s == 0


def test_zero3_gathers_are_prefetched():
    plan = _plan(pp=1, dp=8, zero_stage=3, num_microbatches=4)
    t = simulate(plan)
    gathers = [e for e in t.events if e.kind == "gather"]
    # before every forward and every backward, one bucket per layer (at most 8)
    assert len(gathers) == 2 * 4 * plan_costs(plan).chunk_buckets[0] == 2 * 4 * 8
    assert t.comm["dp_gather"].overlapped_s > 0


def test_tp_backward_hidden_behind_wgrad_only_for_megatron():
    torch_t = simulate(_plan(tp=8, num_microbatches=2, seq=2048))
    meg_t = simulate(_plan(tp=8, num_microbatches=2, seq=2048, engine="megatron"))
    assert torch_t.comm["tp"].overlapped_s == 0
    assert meg_t.comm["tp"].overlapped_s > 0


def test_critical_path_ends_at_the_step_time_and_json_round_trips():
    t = simulate(_plan(pp=4, dp=2, num_microbatches=8))
    crit = [e for e in t.events if e.critical]
    assert max(e.end_s for e in crit) == t.step_s
    assert min(e.start_s for e in crit) == 0.0
    d = json.loads(json.dumps(t.to_dict()))
    assert len(d["events"]) == len(t.events) and d["step_s"] == t.step_s
    assert all(0 < u <= 1 for u in d["utilisation"])


def test_bad_costs_are_value_errors():
    with pytest.raises(ValueError, match="chunk_fwd_s has 3 entries; expected 4"):
        SimCosts(schedule="1f1b", pp=4, num_microbatches=4, chunk_fwd_s=[1] * 3,
                 chunk_bwd_s=[1] * 4)
    with pytest.raises(ValueError, match="dp_mode"):
        SimCosts(schedule="1f1b", pp=1, num_microbatches=1, chunk_fwd_s=[1], chunk_bwd_s=[1],
                 dp_mode="ring")
    with pytest.raises(ValueError, match="zbv runs exactly 2 virtual stages per rank, got 3"):
        _uniform("zbv", 2, 4, 3)
    with pytest.raises(ValueError, match="num_microbatches must be an integer >= 1, got 0"):
        _uniform("1f1b", 2, 0)
    assert math.isfinite(simulate_costs(_uniform("1f1b", 1, 1)).step_s)


# --- pictures and CLI -------------------------------------------------------------------------

def _timeline_chart(t):
    from planner import charts
    return charts.timeline_chart(t.events, title=charts.timeline_title(t),
                                 width=charts.TIMELINE_WIDTH)


def test_png_is_a_valid_image_of_plausible_size():
    import struct
    import zlib

    pytest.importorskip("vl_convert")
    from planner.charts import render
    t = simulate_costs(_uniform("1f1b", 4, 8))
    data = render(_timeline_chart(t), "png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 1000 < width < 6000 and 8 * 22 < height < 2000  # 4 stages x 2 rows, title, legend
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]  # IHDR's CRC
    assert data.endswith(b"IEND\xaeB`\x82") and len(data) > 10_000


def test_svg_has_the_stage_labels_and_micro_batches_as_text():
    import re

    pytest.importorskip("vl_convert")
    from planner.charts import render
    t = simulate_costs(_uniform("1f1b", 4, 8))
    svg = render(_timeline_chart(t), "svg")
    assert svg.lstrip().startswith("<svg")
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    for r in range(4):
        assert f"stage {r} compute" in texts and f"stage {r} comm" in texts
    assert {"0", "7", "forward", "backward"} <= set(texts)
    assert "1f1b pp=4 v=1 m=8: step 33 s, bubble 27.3%" in texts  # (m + p - 1)(F + B), (p-1)/11


def test_html_is_one_page_embedding_the_spec():
    pytest.importorskip("vl_convert")
    from planner.charts import render, spec
    t = simulate_costs(_uniform("1f1b", 2, 4))
    chart = _timeline_chart(t)
    html = render(chart, "html")
    assert "vegaEmbed(" in html
    embedded = json.JSONDecoder().raw_decode(html, html.index("const spec = ") + 13)[0]
    assert embedded == spec(chart)  # the whole spec, data included
    (events,) = embedded["datasets"].values()
    assert len(events) == sum(e.end_s > e.start_s for e in t.events)  # zero-length: not drawn
    assert "<script src=" not in html  # Vega's JavaScript is inlined: it opens offline


def test_ui_and_cli_draw_the_timeline_with_the_same_function(tmp_path, monkeypatch):
    pytest.importorskip("vl_convert")
    pd = pytest.importorskip("pandas")
    import app.charts
    import planner.charts
    from planner.cli import main
    assert app.charts.timeline_chart is planner.charts.timeline_chart
    assert app.charts.memory_chart is planner.charts.memory_chart
    assert app.charts.time_chart is planner.charts.time_chart
    t = simulate_costs(_uniform("interleaved_1f1b", 2, 4, v=2))
    # the page hands over a DataFrame of the events, the CLI the Event objects: one spec
    frame = pd.DataFrame([e.to_dict() for e in t.events])
    assert planner.charts.timeline_chart(frame).to_dict() == \
        planner.charts.timeline_chart(t.events).to_dict()
    calls = []
    real = planner.charts.timeline_chart
    monkeypatch.setattr(planner.charts, "timeline_chart",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    plan = tmp_path / "plan.json"
    _plan(pp=2, dp=4, num_microbatches=4).save(plan)
    assert main(["simulate", str(plan), "--out", str(tmp_path / "t.svg")]) == 0
    assert len(calls) == 1 and len(calls[0][0]) == len(simulate(Plan.load(plan)).events)


def test_a_missing_renderer_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    from planner.charts import EXTRA, render
    from planner.cli import main
    assert EXTRA == 'pip install "parallel-planner[charts]"'
    plan = tmp_path / "plan.json"
    _plan(pp=2, dp=4, num_microbatches=4).save(plan)
    monkeypatch.setitem(sys.modules, "vl_convert", None)  # as if not installed
    for fmt in ("png", "svg", "html"):
        assert main(["simulate", str(plan), "--out", str(tmp_path / f"t.{fmt}")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and EXTRA in err and "vl-convert-python" in err
        assert not (tmp_path / f"t.{fmt}").exists()
    with pytest.raises(ValueError, match="parallel-planner"):
        render(None, "png")
    monkeypatch.setitem(sys.modules, "altair", None)
    assert main(["simulate", str(plan), "--out", str(tmp_path / "t.json")]) == 0  # no chart


def test_cli_writes_png_svg_html_and_json(tmp_path, capsys):
    pytest.importorskip("vl_convert")
    from planner.cli import main
    plan = tmp_path / "plan.json"
    _plan(pp=4, dp=2, num_microbatches=8).save(plan)
    png, html, js = tmp_path / "t.png", tmp_path / "t.html", tmp_path / "t.json"
    assert main(["simulate", str(plan), "--out", str(png), "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "pipeline bubble" in out and "critical path" in out
    assert png.read_bytes()[:4] == b"\x89PNG" and "vegaEmbed(" in html.read_text()
    assert main(["simulate", str(plan), "--out", str(tmp_path / "t.svg")]) == 0
    assert "stage 3 compute" in (tmp_path / "t.svg").read_text()
    assert main(["simulate", str(plan), "--out", str(js)]) == 0
    assert len(json.loads(js.read_text())["events"]) > 64
    capsys.readouterr()
    assert main(["simulate", str(plan), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pp"] == 4
    assert main(["simulate", str(plan), "--out", str(tmp_path / "t.gif")]) == 2
    assert "unknown format 'gif'" in capsys.readouterr().err
