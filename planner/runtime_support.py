"""What the reference runtime's model (runtime/model.py) builds from a ModelSpec, as a planner
fact: a plan for an engine that runs that model (torch, deepspeed) is refused, by the rule
`runtime_model` (planner/rules.py), when the spec has a feature the model would build wrongly
or not at all.  Megatron-LM builds its own model from the exported arguments.

Each entry: (feature present in the spec, what the runtime lacks)."""

# runtime/model.py's blocks today: attention q/o are hidden x hidden (head_dim is hidden/heads),
# biases on every linear or none, no q/k norms, no sinks, no latent attention, a dense MLP.
RUNTIME_BUILDS_MOE = True  # runtime/moe.py (issue 13, item 5)

_GAPS = (
    (lambda s: s.qkv_bias, "qkv_bias (biases on q/k/v only)"),
    (lambda s: s.qk_norm, "qk_norm (per-head q/k RMSNorm)"),
    (lambda s: s.attention_sinks, "attention_sinks"),
    (lambda s: s.mla is not None, "mla (multi-head latent attention)"),
    (lambda s: s.moe is not None and not RUNTIME_BUILDS_MOE,
     "moe (no mixture-of-experts block yet)"),
    (lambda s: s.moe is not None and s.moe.capacity_factor > 0,
     "moe capacity_factor > 0 (its MoE routing is dropless)"),
)


def runtime_gaps(spec) -> list:
    """What runtime/model.py cannot build of `spec` (empty: it builds it exactly)."""
    return [text.format(a=spec.attention_head_dim) for test, text in _GAPS if test(spec)]
