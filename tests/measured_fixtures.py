"""A measured.json as the runtime writes it, with known values, for compare and calibrate tests."""

from planner.cost.memory import rank_memory, rank_model_state


def measured_dict(plan, step_s: float, activation_scale: float = 1.0) -> dict:
    """Exact model states per rank, activations x `activation_scale`, the given step time."""
    lay, ranks = plan.layout, []
    for rank in range(lay.world_size):  # mesh order (pp, dp, tp), tp innermost
        pp, dp, tp = rank // (lay.dp * lay.tp), (rank // lay.tp) % lay.dp, rank % lay.tp
        states = rank_model_state(plan, pp, dp, tp)
        ranks.append({"rank": rank, "coords": {"pp": pp, "dp": dp, "tp": tp},
                      "weights_bytes": states.weights_bytes,
                      "gradients_bytes": states.gradients_bytes,
                      "optimizer_bytes": states.optimizer_bytes,
                      "activation_bytes_per_microbatch":
                          activation_scale * rank_memory(plan, pp).activation_bytes_per_microbatch,
                      "activation_peak_bytes": 1e6, "peak_allocated_bytes": None,
                      "max_rss_bytes": 300e6})
    tokens = plan.job.global_batch * plan.job.seq_len
    return {"schema_version": 1, "plan": plan.to_dict(), "steps": [], "val_loss": 5.0,
            "step_time_s": step_s, "tokens_per_s": tokens / step_s, "ranks": ranks}
