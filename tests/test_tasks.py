"""Fine-tuning tasks (planner/job.py task, runtime/tasks.py): classification and SFT data made
by the tests, planner and runtime agreeing on the classifier head's parameters, model-state
bytes and activations, data-parallel runs equal to one process, accuracy reported, and the
whole path through `python -m runtime.train` (with LoRA and merge-and-save)."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from runtime_dist import SPEC, Layout, make_plan, run_world
from test_runtime_parity import _max_param_diff, check_memory

from planner.cost.flops import microbatch_flops
from planner.cost.params import count_parameters
from planner.job import Job
from planner.lora import LoraSpec
from runtime.tasks import classify_sample, label_ids, read_records, sft_sample, task_samples

BERT = dataclasses.replace(SPEC, name="test-bert", arch="bert", num_kv_heads=8,
                           tie_embeddings=True, linear_bias=True)
WORDS = ["good", "bad", "fine", "awful", "great", "poor"]


def classify_rows(n=96):
    """Texts whose label is whether the first word is positive (a learnable rule)."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        picks = [WORDS[int(j)] for j in torch.randint(len(WORDS), (4,), generator=gen)]
        rows.append({"text": " ".join(picks), "label": int(picks[0] in ("good", "fine", "great"))})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def task_plan(layout, task, spec=SPEC, lora=None, num_labels=2):
    plan = make_plan(layout, spec)
    return dataclasses.replace(plan, job=dataclasses.replace(plan.job, task=task, lora=lora,
                                                             num_labels=num_labels))


# --- data ---------------------------------------------------------------------------------------
def test_csv_and_jsonl_give_the_same_classification_records(tmp_path):
    rows = classify_rows(8)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    a = read_records(csv_path, "classify", 1 << 20)
    b = read_records(write_jsonl(tmp_path / "d.jsonl", rows), "classify", 1 << 20)
    assert label_ids(a, 2, "d") == label_ids(b, 2, "d") == [r["label"] for r in rows]
    assert [r["text"] for r in a] == [r["text"] for r in b]


def test_label_names_map_in_sorted_order_and_too_many_are_refused():
    rows = [{"label": "neg"}, {"label": "pos"}, {"label": "neg"}]
    assert label_ids(rows, 2, "d") == [0, 1, 0]
    with pytest.raises(ValueError, match="3 distinct labels; the plan's classifier has "
                                         "num_labels 2"):
        label_ids(rows + [{"label": "mixed"}], 2, "d")
    with pytest.raises(ValueError, match="label 5; the plan's classifier has num_labels 2"):
        label_ids([{"label": 5}, {"label": 0}], 2, "d")


def test_a_record_without_its_fields_is_refused_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    with pytest.raises(ValueError, match="record 2: needs fields prompt and response"):
        read_records(path, "sft", 1 << 20)


def test_classification_pools_the_first_token_of_an_encoder_and_the_last_of_a_decoder():
    x, y = classify_sample([5, 6, 7], 1, 8, causal=True)
    assert x.tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert y.tolist() == [-100, -100, 1] + [-100] * 5
    _, y = classify_sample([5, 6, 7], 1, 8, causal=False)
    assert y.tolist() == [1] + [-100] * 7


def test_sft_trains_on_the_response_tokens_only():
    x, y = sft_sample([1, 2, 3], [7, 8], 8)
    assert x.tolist() == [1, 2, 3, 7, 0, 0, 0, 0]
    assert y.tolist() == [-100, -100, 7, 8, -100, -100, -100, -100]  # predicts 7 after 3
    x, y = sft_sample([1, 2, 3], [7, 8, 9, 10], 4)  # cut to seq_len + 1 tokens
    assert x.tolist() == [1, 2, 3, 7] and y.tolist() == [-100, -100, 7, 8]


# --- planner and runtime agree ------------------------------------------------------------------
def test_the_classifier_head_replaces_the_vocabulary_head_in_counts_and_flops():
    from runtime.model import Transformer
    for spec in (SPEC, BERT):
        for lora in (None, LoraSpec(rank=2, targets=("q", "v"))):
            job = Job(global_batch=8, seq_len=32, task="classify", num_labels=3, lora=lora)
            model = Transformer(spec, num_labels=3)
            if lora is not None:
                from runtime.lora import apply_lora
                apply_lora(model, lora, torch.float32)
            assert sum(p.numel() for p in model.parameters()) == count_parameters(spec, job)
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert trained == count_parameters(spec, job, trainable_only=True)
            assert model.head.classifier.weight.requires_grad
    job = Job(global_batch=8, seq_len=32, task="classify", num_labels=3)
    mb = microbatch_flops(SPEC, 8, 32, 1, job)
    assert mb.head_flops == 2 * 8 * 32 * SPEC.hidden_size * 3
    sft = Job(global_batch=8, seq_len=32, task="sft")
    assert microbatch_flops(SPEC, 8, 32, 1, sft) == microbatch_flops(SPEC, 8, 32, 1)


def _task_rank(plan, samples, steps: int) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from runtime.engine import Engine
    from runtime.mesh import init_distributed
    from runtime.model import canonical_name
    from runtime.tasks import TaskData
    ctx = init_distributed(plan.layout, timeout_s=60)
    engine = Engine(plan, ctx)
    data = TaskData(samples, plan.layout, ctx.dp_rank)
    losses, record = [], {}
    for step in range(steps):
        losses.append(engine.train_step(*data.batch(step), record if step == 1 else None))
    x, y = data.val_batch(0)
    if plan.job.task == "classify":
        val, accuracy = engine.eval_accuracy(x, y)
    else:
        val, accuracy = engine.eval_loss(x, y), None
    params = {}
    for module in engine.modules:
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
        params.update({canonical_name(plan.model, k): v for k, v in full.items()})
    return {"coords": dict(ctx.coords), "losses": losses, "record": record, "val": val,
            "accuracy": accuracy, "params": params if ctx.dp_rank == 0 else None}


def _many(plans, samples, steps):
    return [_task_rank(p, s, steps) for p, s in zip(plans, samples)]


CASES = {
    "classify-dp2": ("classify", SPEC, None, Layout(dp=2, micro_batch=2, num_microbatches=2)),
    "classify-bert-zero2": ("classify", BERT, None,
                            Layout(dp=2, micro_batch=2, num_microbatches=2, zero_stage=2)),
    "classify-lora-zero3": ("classify", SPEC, LoraSpec(rank=4, targets=("q", "v")),
                            Layout(dp=2, micro_batch=4, zero_stage=3)),
    "sft-dp2": ("sft", SPEC, None, Layout(dp=2, micro_batch=2, num_microbatches=2)),
    "sft-lora-pp2": ("sft", SPEC, LoraSpec(rank=4), Layout(pp=2, micro_batch=2,
                                                          num_microbatches=4)),
}
REFERENCE = Layout(micro_batch=2, num_microbatches=4)


def _samples(task, spec):
    plan = task_plan(REFERENCE, task, spec)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        from pathlib import Path
        if task == "classify":
            path = write_jsonl(Path(d) / "c.jsonl", classify_rows())
        else:
            rows = [{"prompt": f"Q: {r['text']}?", "response": " yes" if r["label"] else " no"}
                    for r in classify_rows()]
            path = write_jsonl(Path(d) / "s.jsonl", rows)
        return task_samples(plan, path, cap_bytes=1 << 20)


@functools.cache
def results() -> dict:
    out = {}
    for world in (1, 2):
        names = [n for n, c in CASES.items() if c[3].world_size == world] if world > 1 else \
            [n for n in CASES]
        plans = [task_plan(CASES[n][3] if world > 1 else REFERENCE, CASES[n][0], CASES[n][1],
                           CASES[n][2]) for n in names]
        samples = [_samples(CASES[n][0], CASES[n][1]) for n in names]
        ranks = run_world(world, _many, plans, samples, 3)
        for i, name in enumerate(names):
            mine = [r[i] for r in ranks]
            params = {}
            for r in mine:
                params.update(r["params"] or {})
            out[(world, name)] = {"losses": mine[0]["losses"], "val": mine[0]["val"],
                                  "accuracy": mine[0]["accuracy"], "params": params,
                                  "ranks": [(r["coords"], r["record"]) for r in mine],
                                  "plan": plans[i]}
    return out


@pytest.mark.parametrize("name", CASES)
def test_task_layouts_train_like_one_process_with_the_planned_bytes(name):
    got, want = results()[(2, name)], results()[(1, name)]
    loss_diff = max(abs(a - b) for a, b in zip(got["losses"], want["losses"]))
    param_diff = _max_param_diff(got["params"], want["params"])
    print(f"{name}: max |loss diff| {loss_diff:.2e}  max |param diff| {param_diff:.2e}  "
          f"accuracy {got['accuracy']}")
    assert loss_diff <= 2e-5 and param_diff <= 1e-4
    assert abs(got["val"] - want["val"]) <= 2e-5
    if CASES[name][0] == "classify":
        assert got["accuracy"] == want["accuracy"] and 0.0 <= got["accuracy"] <= 1.0
    check_memory(got["plan"], got["ranks"])


# --- end to end ---------------------------------------------------------------------------------
def test_lora_classification_through_torchrun_reports_accuracy_and_merges(tmp_path):
    from planner.plan import Plan
    plan = task_plan(Layout(dp=2, micro_batch=2, num_microbatches=2), "classify",
                     lora=LoraSpec(rank=4, targets=("q", "k", "v", "o")))
    plan.save(tmp_path / "plan.json")
    data = write_jsonl(tmp_path / "train.jsonl", classify_rows())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "runtime.train", "--plan", str(tmp_path / "plan.json"),
           "--steps", "4", "--data", data, "--metrics", str(tmp_path / "m.jsonl"),
           "--eval-every", "4", "--lora-merge-out", str(tmp_path / "merged")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert 0.0 <= rows[-1]["val_accuracy"] <= 1.0
    assert rows[0]["loss_tokens"] == plan.job.global_batch  # one pooled position per text
    merged = torch.load(tmp_path / "merged" / "merged.pt")
    assert not any(".lora_" in k for k in merged) and "head.classifier.weight" in merged
    assert Plan.load(tmp_path / "plan.json").job.lora.rank == 4
