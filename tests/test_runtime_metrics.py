"""runtime.train --metrics: one JSON line per step on rank 0 (loss, lr, step time, tokens/s,
grad norm, memory), val_loss on the --eval-every steps; --tensorboard only where it imports."""

import contextlib
import io
import json
import sys

import pytest
from runtime_dist import Layout, make_plan, run_world

PLAN2 = Layout(dp=2, micro_batch=2, num_microbatches=2, zero_stage=2)
KEYS = {"step", "loss", "lr", "step_time_s", "tokens_per_s", "grad_norm", "memory_bytes",
        "peak_allocated_bytes"}


def _main_rank(argv: list) -> tuple:
    from runtime.train import main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    return code, err.getvalue(), out.getvalue()


def test_metrics_jsonl_every_step_and_evaluation_every_k(tmp_path):
    plan, metrics, measured = tmp_path / "plan.json", tmp_path / "m.jsonl", tmp_path / "m.json"
    make_plan(PLAN2).save(plan)
    argv = ["--plan", str(plan), "--steps", "4", "--data-cap-mb", "1", "--timeout", "30",
            "--metrics", str(metrics), "--eval-every", "2", "--out", str(measured)]
    results = run_world(2, _main_rank, argv, timeout_s=180)
    assert [code for code, _, _ in results] == [0, 0], results
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    record = json.loads(measured.read_text())
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row, step in zip(rows, record["steps"]):
        assert KEYS <= set(row)
        assert row["loss"] == step["loss"] and row["lr"] == step["lr"]
        assert row["tokens_per_s"] == pytest.approx(8 * make_plan(PLAN2).job.seq_len
                                                    / row["step_time_s"])
        assert row["grad_norm"] > 0 and row["memory_bytes"] > 0
        assert row["peak_allocated_bytes"] is None  # CPU: no allocator figure
    assert ["val_loss" in r for r in rows] == [False, True, False, True]
    assert rows[-1]["val_loss"] == record["val_loss"]  # the end-of-run evaluation, reused
    assert rows[1]["val_loss"] > 0


def test_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch):
    import runtime.metrics
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    make_plan(PLAN2).save(tmp_path / "plan.json")
    code, err, _ = _main_rank(["--plan", str(tmp_path / "plan.json"), "--steps", "2",
                               "--tensorboard", str(tmp_path / "tb")])
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("runtime.train: error: --tensorboard needs the tensorboard package")
    assert runtime.metrics.NO_TENSORBOARD.split("(")[0] in err


def test_metrics_writer_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from runtime.metrics import MetricsWriter
    writer = MetricsWriter(tmp_path / "m.jsonl", tmp_path / "tb")
    writer.write({"step": 0, "loss": 5.0, "lr": 1e-3, "grad_norm": None, "val_loss": 4.0})
    writer.close()
    assert json.loads((tmp_path / "m.jsonl").read_text())["grad_norm"] is None
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
