"""Sidebar: model, cluster, job and constraints.  Returns planner objects, or raises ValueError
with the one-line reason (the page shows it with st.error)."""

from dataclasses import dataclass
from typing import TypeVar

import streamlit as st

from app.searching import objectives
from app.uploads import MAX_UPLOAD_BYTES, model_from_upload, profile_from_upload
from planner.hardware import Cluster, list_profiles, load_profile
from planner.job import ATTENTION, ENGINES, FP8_RECIPES, PRECISIONS, TASKS, Job
from planner.lora import DEFAULT_TARGETS, TARGETS, LoraSpec
from planner.presets import MODEL_PRESETS

UPLOAD = "upload a JSON file..."
DEFAULT_MODEL, DEFAULT_NODES = "llama3-70b", 4   # a case where pipelining matters
OBJECTIVE_LABELS = {"throughput": "fastest (tokens/s)", "min-gpus": "fewest GPUs that fit",
                    "time-to-train": "shortest time to train a token budget"}

T = TypeVar("T")


def chosen(value: T | None) -> T:
    """A selectbox's value: None only for a box without options, and none here lacks them."""
    if value is None:
        raise ValueError("nothing is selected")
    return value


@dataclass(frozen=True)
class Constraints:
    max_tp: int
    headroom: float     # fraction of GPU memory to leave free
    objective: str
    token_budget: float = 0.0   # tokens to train (time-to-train objective)


def _model():
    names = list(MODEL_PRESETS) + [UPLOAD]
    choice = st.selectbox("Model", names, index=names.index(DEFAULT_MODEL)
                          if DEFAULT_MODEL in names else 0, key="model",
                          help="a preset, or your own spec JSON / Hugging Face config.json")
    if choice != UPLOAD:
        return MODEL_PRESETS[choice]
    up = st.file_uploader("Model spec JSON or HF config.json", type=["json"], key="model_file",
                          help=f"at most {MAX_UPLOAD_BYTES // 1000} kB")
    if up is None:
        raise ValueError("choose a model spec JSON or Hugging Face config.json to upload")
    return model_from_upload(up.getvalue(), up.name)


def _cluster() -> Cluster:
    names = list_profiles() + [UPLOAD]
    choice = st.selectbox("GPU profile", names, index=names.index("a100-80g")
                          if "a100-80g" in names else 0, key="profile")
    if choice == UPLOAD:
        up = st.file_uploader("Hardware profile JSON", type=["json"], key="profile_file")
        if up is None:
            raise ValueError("choose a hardware profile JSON to upload")
        profile = profile_from_upload(up.getvalue(), up.name)
    else:
        profile = load_profile(choice)
    nodes = st.number_input("Nodes", min_value=1, max_value=4096, value=DEFAULT_NODES, step=1,
                            key="nodes", help=f"{profile.gpus_per_node} GPU(s) per node")
    return Cluster(profile=profile, num_nodes=int(nodes))


def _job() -> Job:
    batch = st.number_input("Global batch (sequences)", min_value=1, value=256, step=1,
                            key="global_batch")
    seq = st.number_input("Sequence length", min_value=1, value=4096, step=128, key="seq_len")
    precision = st.selectbox("Precision", PRECISIONS, key="precision",
                             help="fp8: the blocks' linear GEMMs in FP8, the rest in bf16 "
                                  "(Hopper-class GPUs)")
    with st.expander("Kernels and engine"):
        attention = st.selectbox("Attention", ATTENTION, key="attention")
        engine = st.selectbox("Engine", ENGINES, key="engine")
    task, num_labels, lora = _fine_tuning()
    recipe: str | None = "none"
    if precision == "fp8":
        recipe = st.selectbox("FP8 recipe", FP8_RECIPES, key="fp8_recipe",
                              help="tensorwise / rowwise: torchao (torch engine); delayed / "
                                   "tensorwise: Transformer Engine (megatron engine)")
    return Job(global_batch=int(batch), seq_len=int(seq), precision=chosen(precision),
               attention=chosen(attention), engine=chosen(engine), fp8_recipe=chosen(recipe),
               task=task, num_labels=num_labels, lora=lora)


def _fine_tuning() -> tuple:
    """(task, num_labels, LoraSpec or None) from the fine-tuning widgets."""
    with st.expander("Task and LoRA"):
        task = st.selectbox("Task", TASKS, key="task",
                            help="pretrain: LM loss; classify: a classifier head on the pooled "
                                 "token; sft: LM loss on the responses only")
        num_labels = 2
        if task == "classify":
            num_labels = int(st.number_input("Labels", min_value=2, value=2, step=1,
                                             key="num_labels"))
        if not st.checkbox("LoRA adapters (frozen base)", key="lora"):
            return task, num_labels, None
        rank = st.number_input("LoRA rank", min_value=1, max_value=4096, value=16, step=1,
                               key="lora_rank")
        alpha = st.number_input("LoRA alpha", min_value=0.01, value=16.0, key="lora_alpha")
        targets = st.multiselect("LoRA targets", list(TARGETS), default=list(DEFAULT_TARGETS),
                                 key="lora_targets")
        base_4bit = st.checkbox("4-bit base (QLoRA memory only)", key="lora_base_4bit")
        return task, num_labels, LoraSpec(rank=int(rank), alpha=float(alpha),
                                          targets=tuple(targets), base_4bit=base_4bit)


def _constraints(gpus_per_node: int) -> Constraints:
    tps = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= max(gpus_per_node, 1)] or [1]
    max_tp = st.select_slider("Max TP", options=tps, value=tps[-1], key="max_tp")
    headroom = st.slider("Memory headroom (%)", 0, 50, 10, step=1, key="headroom",
                         help="keep this share of GPU memory free")
    objective = st.radio("Objective", list(objectives()),
                         format_func=lambda o: OBJECTIVE_LABELS.get(o, o), key="objective")
    budget = 0.0
    if objective == "time-to-train":
        budget = st.number_input("Token budget (billions)", min_value=0.001, value=1000.0,
                                 key="token_budget") * 1e9
    return Constraints(max_tp=int(max_tp), headroom=headroom / 100, objective=objective,
                       token_budget=float(budget))


def _section(title: str, fn, errors: list, *args):
    st.header(title)
    try:
        return fn(*args)
    except ValueError as exc:
        errors.append(f"{title}: {exc}")
        return None


def sidebar() -> tuple:
    """(model, cluster, job, constraints, errors): every section renders even when an earlier
    one failed; a failed section gives None and a one-line message in `errors`."""
    errors: list[str] = []
    with st.sidebar:
        model = _section("Model", _model, errors)
        cluster = _section("Cluster", _cluster, errors)
        job = _section("Job", _job, errors)
        gpn = cluster.profile.gpus_per_node if cluster else 8
        constraints = _section("Constraints", _constraints, errors, gpn)
    return model, cluster, job, constraints, errors
