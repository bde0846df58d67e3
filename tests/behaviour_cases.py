"""A fixed set of `planner estimate`, `suggest --top 5` and `simulate` invocations whose `--json`
output is recorded in tests/fixtures/behaviour_golden.json: every engine, schedule, ZeRO stage,
recompute policy, GQA, the DGX-1 mesh, fp16/fp32 and nothing-fits.  Restructuring the planner
must leave every number of every case unchanged (tests/test_behaviour_golden.py).

Re-record only for an intended change of behaviour: python -m tests.behaviour_cases"""

import contextlib
import io
import json
import pathlib
import sys

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "behaviour_golden.json"

_L7 = "--model llama2-7b --cluster a100-80g --global-batch 64 --seq-len 4096"
_L70 = "--model llama2-70b --cluster a100-80g --nodes 4 --global-batch 256 --seq-len 4096"
_G2 = "--model gpt2-1.5b --cluster v100-16g --global-batch 64 --seq-len 1024 --precision fp16"

ESTIMATES = [
    f"{_L7} --dp 4 --tp 2 --sp --zero 1 --micro-batch 2",
    f"{_L7} --dp 4 --tp 2 --sp --zero 1 --micro-batch 2 --engine megatron",
    f"{_L7} --dp 8 --zero 3 --micro-batch 1 --recompute full",
    f"{_L7} --dp 8 --zero 2 --micro-batch 2 --recompute selective",
    f"{_L7} --dp 2 --tp 2 --pp 2 --micro-batch 1 --schedule gpipe",
    f"{_L7} --dp 2 --tp 2 --pp 2 --micro-batch 1 --schedule 1f1b --zero 1",
    f"{_L70} --dp 4 --tp 8 --pp 1 --zero 3 --sp --micro-batch 1 --recompute selective",
    f"{_L70} --dp 2 --tp 4 --pp 4 --sp --micro-batch 1 --schedule interleaved_1f1b "
    "--virtual-stages 2 --zero 1",
    f"{_L70} --dp 2 --tp 4 --pp 4 --sp --micro-batch 1 --schedule interleaved_1f1b "
    "--virtual-stages 2 --zero 1 --engine megatron",
    f"{_L70} --dp 2 --tp 4 --pp 4 --sp --micro-batch 1 --schedule interleaved_zb "
    "--virtual-stages 2 --zero 2",
    f"{_L70} --dp 2 --tp 4 --pp 4 --sp --micro-batch 1 --schedule zbv --virtual-stages 2 "
    "--zero 2 --recompute full",
    "--model llama3-8b --cluster h100-80g --global-batch 32 --seq-len 8192 --dp 8 --zero 3 "
    "--micro-batch 1 --recompute full",
    "--model llama3-8b --cluster h100-80g --global-batch 32 --seq-len 8192 --dp 2 --tp 4 --sp "
    "--micro-batch 2 --mesh-order dp,pp,tp",
    f"{_G2} --dp 8 --zero 2 --micro-batch 2",
    f"{_G2} --dp 2 --tp 4 --micro-batch 4 --zero 1 --engine megatron",  # 25 heads: refused
    f"{_G2} --dp 8 --micro-batch 4 --zero 1 --engine megatron",
    f"{_G2} --dp 4 --pp 2 --micro-batch 2 --schedule 1f1b --zero 1",
    "--model bert-large --cluster v100-16g --global-batch 256 --seq-len 512 --precision fp16 "
    "--dp 8 --micro-batch 8 --attention eager",
    "--model gpt3-1.3b --cluster a100-40g --global-batch 64 --seq-len 2048 --precision fp32 "
    "--dp 4 --tp 2 --micro-batch 2 --zero 1 --attention fused",
    "--model tiny --cluster cpu --global-batch 32 --seq-len 256 --precision fp32 --dp 2 --tp 2 "
    "--pp 2 --micro-batch 4 --zero 1",
    "--model tiny --cluster cpu --global-batch 32 --seq-len 256 --precision fp32 --dp 4 --pp 2 "
    "--micro-batch 4 --zero 2 --schedule gpipe",
    "--model gpt2-124m --cluster a100-80g --nodes 64 --global-batch 2048 --seq-len 1024 "
    "--dp 16 --tp 4 --pp 8 --micro-batch 2 --zero 3 --schedule 1f1b --recompute none",
    "--model llama3-70b --cluster h200 --nodes 2 --global-batch 128 --seq-len 8192 --dp 2 "
    "--tp 8 --pp 1 --sp --zero 3 --micro-batch 1 --recompute full --engine megatron",
]

SUGGESTS = [
    "--model llama2-70b --cluster a100-80g --nodes 2 --global-batch 512 --seq-len 4096",
    "--model llama2-7b --cluster a100-80g --global-batch 64 --seq-len 4096 --engine megatron",
    "--model gpt2-1.5b --cluster v100-16g --global-batch 64 --seq-len 1024 --precision fp16",
    "--model bert-large --cluster v100-16g --global-batch 256 --seq-len 512 --precision fp16",
    "--model tiny --cluster cpu --global-batch 32 --seq-len 256 --precision fp32",
    "--model llama3-8b --cluster h100-80g --global-batch 64 --seq-len 8192 --objective min-gpus "
    "--target-tokens-per-s 50000",
    "--model llama3-405b --cluster a100-40g --global-batch 64 --seq-len 8192",  # nothing fits
]

# simulate lists every event: the 70B pipelines run with a smaller batch to keep the file small
SIMULATES = [ESTIMATES[i].replace("--global-batch 256", "--global-batch 32")
             for i in (0, 4, 5, 7, 9, 10, 14, 16, 19, 20)]


def run_cli(argv: list) -> dict:
    """Exit code, parsed stdout JSON (or None) and the error line of one invocation."""
    from planner.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    text = out.getvalue().strip()
    return {"code": code, "json": json.loads(text) if text else None,
            "error": err.getvalue().strip().splitlines()[-1:] if code else []}


def all_cases() -> list:
    cases = [("estimate", c) for c in ESTIMATES] + [("suggest", c) for c in SUGGESTS]
    return cases + [("simulate", c) for c in SIMULATES]


def argv_of(command: str, args: str) -> list:
    extra = ["--top", "5"] if command == "suggest" else []
    return [command, *args.split(), *extra, "--json"]


def record() -> dict:
    return {f"{cmd} {args}": run_cli(argv_of(cmd, args)) for cmd, args in all_cases()}


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(record(), sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
