"""`planner models`: the model presets."""

from planner.cli.common import print_json
from planner.cost.params import count_parameters
from planner.presets import MODEL_PRESETS


def add_parser(sub):
    p = sub.add_parser("models", help="list model presets")
    p.add_argument("--json", action="store_true")
    return p


def run(args) -> int:
    rows = [{"name": s.name, "arch": s.arch, "parameters": count_parameters(s),
             "layers": s.num_layers, "hidden": s.hidden_size, "heads": s.num_heads,
             "kv_heads": s.num_kv_heads, "ffn": s.ffn_hidden_size, "vocab": s.vocab_size,
             "max_seq_len": s.max_seq_len} for s in MODEL_PRESETS.values()]
    if args.json:
        print_json(rows)
        return 0
    print(f"{'name':<12} {'arch':<6} {'parameters':>17} {'layers':>6} {'hidden':>6} "
          f"{'heads':>5} {'kv':>4} {'ffn':>6} {'vocab':>7} {'seq':>5}")
    for r in rows:
        print(f"{r['name']:<12} {r['arch']:<6} {r['parameters']:>17,} {r['layers']:>6} "
              f"{r['hidden']:>6} {r['heads']:>5} {r['kv_heads']:>4} {r['ffn']:>6} "
              f"{r['vocab']:>7} {r['max_seq_len']:>5}")
    return 0
