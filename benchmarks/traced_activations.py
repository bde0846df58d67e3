"""Traced vs analytic activation bytes (the README's Hugging Face table): transformers' models of
presets traced on the meta device by planner/traced.py (needs the hf extra; cached), one layer
and the embedding/head/loss path, micro-batch 1, one rank without TP, bf16, flash attention.

    python -m benchmarks.traced_activations"""

from planner.job import Job
from planner.presets import MODEL_PRESETS
from planner.units import fmt_bytes

CASES = (("gpt2-124m", 1024), ("gpt2-1.5b", 1024), ("llama2-7b", 4096), ("llama3-8b", 8192),
         ("bert-base", 512), ("bert-large", 512))


def rows() -> list:
    from planner import traced
    out = []
    for name, seq in CASES:
        spec = MODEL_PRESETS[name]
        job = Job(global_batch=1, seq_len=seq, precision="bf16")
        t = traced.for_job(spec, job)
        c = traced.comparison(t, spec, job, 1)
        out.append((name, t.model_class, seq, c))
    return out


def table(data: list) -> str:
    lines = ["| model | transformers class | seq | layer traced | layer analytic | traced / "
             "analytic | embedding+head+loss traced | analytic |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, cls, seq, c in data:
        lines.append(f"| {name} | {cls} | {seq} | {fmt_bytes(c['layer_traced_bytes'])} | "
                     f"{fmt_bytes(c['layer_analytic_bytes'])} | "
                     f"{c['layer_traced_bytes'] / c['layer_analytic_bytes']:.2f} | "
                     f"{fmt_bytes(c['rest_traced_bytes'])} | "
                     f"{fmt_bytes(c['rest_analytic_bytes'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(rows()))
