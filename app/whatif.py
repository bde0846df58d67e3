"""What-if: set dp/tp/pp/cp (and its flavour)/ZeRO (and its hybrid shard group)/micro-batch/
recompute (the policy and every K-th block), torch.compile, the schedule, the mesh order and the
layers of each pipeline stage by hand.  The widgets only collect values; validity is decided by
planner.plan (the page shows its one-line reason)."""

import itertools

import streamlit as st

from app.inputs import chosen
from planner.plan import AXES, CP_COMMS, OFFLOADS, RECOMPUTE, SCHEDULES

MESH_ORDERS = [",".join(p) for p in itertools.permutations(AXES)]

FIELDS = ("dp", "tp", "pp", "zero_stage", "micro_batch", "num_microbatches", "virtual_stages",
          "recompute_every", "ep", "etp", "cp", "dp_shard")


def _seed(hint: dict) -> None:
    """Start the hand-set layout from `hint` (the plan inspected last) whenever that changes,
    so a user can pick a ranked plan and then tweak it."""
    if st.session_state.get("_hand_seeded") == hint:
        return
    for f in FIELDS:
        st.session_state[f"hand_{f}"] = int(hint.get(f, 0 if f in ("zero_stage", "dp_shard")
                                                      else 1))
    st.session_state["hand_sp"] = bool(hint.get("sequence_parallel", False))
    st.session_state["hand_compile"] = bool(hint.get("compile", False))
    st.session_state["hand_schedule"] = hint.get("schedule", "1f1b")
    st.session_state["hand_recompute"] = hint.get("recompute", "none")
    st.session_state["hand_cp_comm"] = hint.get("cp_comm", "allgather")
    st.session_state["hand_offload"] = hint.get("offload", "none")
    st.session_state["hand_mesh_order"] = ",".join(hint.get("mesh_order", AXES))
    st.session_state["hand_layers"] = ",".join(map(str, hint.get("layers_per_stage", [])))
    st.session_state["_hand_seeded"] = hint


def layout_by_hand(hint: dict, moe: bool = False) -> dict:
    """A layout dict from the what-if widgets (not validated here); ep and etp are shown for
    MoE models only (a dense model has no experts: 1 and 1)."""
    _seed(hint)
    c = st.columns(7)
    dp = c[0].number_input("dp", min_value=1, step=1, key="hand_dp")
    tp = c[1].number_input("tp", min_value=1, step=1, key="hand_tp")
    pp = c[2].number_input("pp", min_value=1, step=1, key="hand_pp")
    zero = c[3].selectbox("ZeRO", [0, 1, 2, 3], key="hand_zero_stage")
    mb = c[4].number_input("micro-batch", min_value=1, step=1, key="hand_micro_batch")
    m = c[5].number_input("micro-batches", min_value=1, step=1, key="hand_num_microbatches",
                          help="per step per data-parallel replica: dp x micro-batch x this "
                               "must equal the global batch")
    rc = c[6].selectbox("recompute", RECOMPUTE, key="hand_recompute")
    c2 = st.columns(7)
    sched = c2[0].selectbox("schedule", SCHEDULES, key="hand_schedule")
    v = c2[1].number_input("virtual stages", min_value=1, step=1, key="hand_virtual_stages")
    sp = c2[2].checkbox("sequence parallel", key="hand_sp")
    order = c2[3].selectbox("mesh order (outer→inner)", MESH_ORDERS, key="hand_mesh_order")
    layers = c2[4].text_input("layers per stage", key="hand_layers",
                              help="comma-separated, one per (virtual) stage; empty = even split")
    compiled = c2[6].checkbox("torch.compile", key="hand_compile",
                              help="compile each transformer block (torch engine only)")
    every = c2[5].number_input("recompute every", min_value=1, step=1,
                               key="hand_recompute_every",
                               help="the recompute policy on every K-th block (0-based blocks "
                                    "K-1, 2K-1, ...: torchtitan's convention), the others none")
    c3 = st.columns(7)
    cp = c3[0].number_input("cp", min_value=1, step=1, key="hand_cp",
                            help="context parallel: each sequence split over cp ranks "
                                 "(load-balanced causal chunks)")
    cp_comm = c3[1].selectbox("cp attention", CP_COMMS, key="hand_cp_comm",
                              help="all-gather of K/V (Llama 3), ring (Ring Attention) or "
                                   "a2a (DeepSpeed-Ulysses); with cp > 1")
    ep, etp = 1, 1
    if moe:
        ep = c3[2].number_input("ep", min_value=1, step=1, key="hand_ep",
                                help="expert parallel: the routed experts split over ep ranks "
                                     "(folded over tp x dp)")
        etp = c3[3].number_input("expert tp", min_value=1, step=1, key="hand_etp",
                                 help="tensor parallel inside each expert (megatron engine)")
    shard = c3[4].number_input("dp shard", min_value=0, step=1, key="hand_dp_shard",
                               help="hybrid sharding: ZeRO shards over groups of this many dp "
                                    "ranks and replicates across dp / this; 0 = all of dp")
    offload = c3[5].selectbox("CPU offload", OFFLOADS, key="hand_offload",
                              help="optimizer states (ZeRO-Offload) or also the parameters "
                                   "in host memory; the verdict covers host memory too")
    return {"dp": int(dp), "tp": int(tp), "pp": int(pp), "ep": int(ep), "etp": int(etp),
            "cp": int(cp), "cp_comm": chosen(cp_comm),
            "dp_shard": int(shard), "offload": offload,
            "sequence_parallel": bool(sp),
            "zero_stage": int(chosen(zero)), "micro_batch": int(mb), "num_microbatches": int(m),
            "schedule": sched, "virtual_stages": int(v), "recompute": rc,
            "recompute_every": int(every),
            "compile": bool(compiled),
            "mesh_order": chosen(order).split(","), "layers_per_stage": parse_layers(layers)}


def parse_layers(text: str):
    """'9,8,8,7' -> [9, 8, 8, 7]; '' -> []; anything else is passed on as typed, so that the
    plan's validation names it."""
    pieces = [p.strip() for p in text.split(",")] if text.strip() else []
    return [int(p) for p in pieces] if all(p.isdigit() for p in pieces) else text
