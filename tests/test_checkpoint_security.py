"""A checkpoint directory is untrusted input: loading one never runs code from it (restricted
unpickling of DCP's .metadata, no pickled bytes entries), damaged files are refused by their
sha256, and every refusal is one line naming the file."""

import functools
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from runtime_dist import Layout, make_plan, run_world

from runtime import checkpoint
from runtime.checkpoint import MANIFEST, METADATA

STEPS, EVERY = 3, 2
ONE = Layout(micro_batch=2, num_microbatches=1)


def _trainer(plan, ckpt_dir, steps, *, every=0, resume=False):
    from runtime.mesh import init_distributed
    from runtime.optim import OptimConfig
    from runtime.train import RunConfig, Trainer
    cfg = RunConfig(steps=steps, data_cap_bytes=1 << 20, checkpoint_dir=ckpt_dir,
                    checkpoint_every=every, resume=resume, val_batches=1)
    trainer = Trainer(plan, cfg, OptimConfig(), init_distributed(plan.layout))
    trainer.run()
    return [s["step"] for s in trainer.steps]


def _make_and_restart(root: str) -> dict:
    """One rank: save step_2; then torchrun restarts (no --resume) on it and on an empty dir."""
    plan = make_plan(ONE)
    _trainer(plan, f"{root}/ck", EVERY, every=EVERY)
    shutil.copytree(f"{root}/ck", f"{root}/restart")
    os.environ["TORCHELASTIC_RESTART_COUNT"] = "1"
    try:
        return {"restart": _trainer(plan, f"{root}/restart", STEPS),
                "restart_empty": _trainer(plan, f"{root}/empty", STEPS)}
    finally:
        del os.environ["TORCHELASTIC_RESTART_COUNT"]


@functools.cache
def _world(root: str) -> dict:
    return run_world(1, _make_and_restart, root)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    return root, _world(str(root))


@pytest.fixture
def step(saved, tmp_path) -> Path:
    """A fresh copy of the real checkpoint step_2, to tamper with."""
    src = saved[0] / "ck" / f"step_{EVERY:08d}"
    return Path(shutil.copytree(src, tmp_path / "ck" / src.name))


def _rewrite_manifest(step: Path) -> None:
    """What an attacker who can write the directory does: make the checksums match again."""
    files = {p.name: checkpoint._digest(p) for p in step.iterdir() if p.name != MANIFEST}
    checkpoint._write_manifest(step, EVERY, files)


def _refused(step: Path, *words) -> str:
    with pytest.raises(ValueError) as err:
        checkpoint.load(object(), step)   # refused before the engine is touched
    text = str(err.value)
    assert "\n" not in text and all(w in text for w in words), text
    return text


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_saved_checkpoint_has_a_manifest_of_every_file(step):
    files = checkpoint.verify(step)
    assert set(files) == {p.name for p in step.iterdir()} - {MANIFEST}
    assert {METADATA, "plan.json"} <= set(files)


def test_the_allowlist_reads_real_metadata_exactly(step):
    files = checkpoint.verify(step)
    with open(step / METADATA, "rb") as f:
        trusted = pickle.load(f)                  # our own file, written just now
    safe = checkpoint.read_metadata(step, files)
    assert safe.state_dict_metadata == trusted.state_dict_metadata
    assert safe.storage_data == trusted.storage_data


def test_metadata_that_runs_code_is_refused(step, tmp_path):
    marker = tmp_path / "pwned"
    (step / METADATA).write_bytes(pickle.dumps(_Payload(marker)))
    _rewrite_manifest(step)
    _refused(step, str(step / METADATA), "posix.system")
    assert not marker.exists()


def test_a_bytes_entry_is_refused(step):
    """DCP would torch.load(weights_only=False) the shard bytes of a BytesStorageMetadata."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    with open(step / METADATA, "rb") as f:
        meta = pickle.load(f)
    meta.state_dict_metadata["train.step"] = BytesStorageMetadata()
    (step / METADATA).write_bytes(pickle.dumps(meta))
    _rewrite_manifest(step)
    _refused(step, str(step / METADATA), "BytesStorageMetadata")


def test_the_reader_refuses_bytes_read_items(step):
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex("x"), dest_offsets=
                    torch.Size([0]), storage_index=MetadataIndex("x"),
                    storage_offsets=torch.Size([0]), lengths=torch.Size([0]))
    reader = checkpoint._SafeReader(step, checkpoint.verify(step))
    with pytest.raises(ValueError, match="pickled bytes"):
        reader.read_data(LoadPlan([item]), None)


def test_data_outside_the_checkpoint_is_refused(step):
    with open(step / METADATA, "rb") as f:
        meta = pickle.load(f)
    info = next(iter(meta.storage_data.values()))
    info.relative_path = "../../etc/passwd"
    (step / METADATA).write_bytes(pickle.dumps(meta))
    _rewrite_manifest(step)
    _refused(step, str(step / METADATA), "'../../etc/passwd'", "not a data file listed")


def test_a_damaged_shard_is_refused(step):
    shard = step / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    shard.write_bytes(bytes(data))
    _refused(step, str(shard), "does not match its sha256")


@pytest.mark.parametrize("damage", ["missing file", "no manifest", "bad manifest"])
def test_missing_or_bad_manifest_entries_are_refused(step, damage):
    if damage == "missing file":
        (step / "plan.json").unlink()
        _refused(step, str(step / "plan.json"), "is missing")
    elif damage == "no manifest":
        (step / MANIFEST).unlink()
        _refused(step, str(step), "no manifest.json")
    else:
        (step / MANIFEST).write_text('{"files": {"../x": {"sha256": "0", "bytes": 1}}}')
        _refused(step, str(step), "manifest.json is not a list of plain file names")


def test_resume_with_crafted_metadata_fails_with_one_line(step, tmp_path):
    """The CLI: --resume on a directory whose newest checkpoint runs code -> exit 2, one line."""
    marker = tmp_path / "pwned"
    (step / METADATA).write_bytes(pickle.dumps(_Payload(marker)))
    _rewrite_manifest(step)
    plan = tmp_path / "plan.json"
    make_plan(ONE).save(plan)
    argv = ["--plan", str(plan), "--steps", str(STEPS), "--data-cap-mb", "1",
            "--checkpoint-dir", str(step.parent), "--resume"]
    code, err = run_world(1, _main_rank, argv, timeout_s=120)[0]
    assert code == 2 and err.count("\n") == 1, err
    assert "the global posix.system" in err and str(step / METADATA) in err
    assert not marker.exists()


def _main_rank(argv):
    import contextlib
    import io

    from runtime.train import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def test_a_torchrun_restart_resumes_without_the_flag(saved):
    """Under torchrun --max-restarts a restarted worker continues from the newest checkpoint,
    or starts at 0 when the crash came before the first one (plain --resume would refuse)."""
    runs = saved[1]
    assert runs["restart"] == list(range(EVERY, STEPS))
    assert runs["restart_empty"] == list(range(STEPS))
