"""`planner profiles`: the hardware profiles."""

from planner.cli.common import print_json
from planner.hardware import list_profiles, load_profile


def add_parser(sub):
    p = sub.add_parser("profiles", help="list hardware profiles")
    p.add_argument("--json", action="store_true")
    return p


def run(args) -> int:
    profiles = [load_profile(n) for n in list_profiles()]
    if args.json:
        print_json([p.to_dict() for p in profiles])
        return 0
    print(f"{'name':<10} {'gpus/node':>9} {'memory':>9} {'bf16 TFLOP/s':>12} {'fabric':<12} "
          f"description")
    for p in profiles:
        bf16 = p.gpu.peak_flops.get("bf16")
        print(f"{p.name:<10} {p.gpus_per_node:>9} {p.gpu.memory_bytes / 2**30:>7.1f}Gi "
              f"{(f'{bf16 / 1e12:.0f}' if bf16 else 'none'):>12} {p.intra_node.kind:<12} "
              f"{p.description}")
    return 0
