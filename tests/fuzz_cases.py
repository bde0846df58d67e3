"""Malformed invocations of every sub-command, for tests/test_fuzz.py: a seeded generator (the same
cases on every run), the in-process harness, and the contract each case is held to:

  exit code 2 and exactly one line on stderr (no traceback, no "internal error"), or
  exit code 0 and, with --json, strict JSON on stdout (no NaN/Infinity tokens);
  and never longer than HANG_S seconds.

Each case starts from a valid invocation and breaks it: a flag's value replaced by a bad token, a
flag dropped, added or repeated, or an input file replaced by a mutant of a valid file (a key
dropped, added or set to an absurd value at any depth, NaN/Infinity/overflowing number tokens,
truncated or re-encoded text, deep nesting) or by a special path (FIFO, /dev/zero, /dev/full,
/proc/self/mem, a directory, an oversized sparse file, a name too long)."""

import contextlib
import io
import json
import os
import random
import signal
import time
from pathlib import Path

from planner.cli import build_parser, main
from planner.hardware import OUTSIDE_TENSOR_KEYS, load_profile
from planner.presets import MODEL_PRESETS

SEED = 20261124
HANG_S = 10.0  # a case still running after this is a hang

BAD_TOKENS = ["", "0", "-1", "-0", "1.5", "1e3", "1e309", "-1e309", "nan", "NaN", "inf", "-inf",
              "Infinity", "abc", "9" * 5000, str(2**31), str(2**63), str(10**30), "1000000000",
              "0x10", " 8", "1_0", "\n", "a\nb", "\x00", "\u0663", "--json", "-", "true", "null",
              "[]", "x" * 10000, "pp,dp", "pp,dp,tp,tp", "tp,pp,dp", "fp8", "zbv", "1e-320"]
BAD_VALUES = [None, True, False, "", "x", "x\ny", "x" * 10000, [], {}, [1, 2], {"a": 1}, [[0, 1]],
              0, -1, 1, 2, 3, 0.5, 1.5, 7, 2**31, 2**63, 10**30, -(10**30), 10**400, 1e-320,
              1e308, -1e308, 1e-9, 1e300]
RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 400, "9" * 5000]
RAW = "@@raw@@"


class Files:
    """Valid input files in `root`, mutants of them, and special paths."""

    def __init__(self, root: Path, measured_fixture: Path):
        self.root, self.count = root, 0
        spec = MODEL_PRESETS["tiny"].to_dict()
        profile = load_profile("cpu").to_dict()
        v1 = json.loads(json.dumps(profile))
        v1["schema_version"] = 1
        for key in ("host_layer_overhead_s", "host_is_device", "shared_cores"):
            del v1["gpu"][key]
        v1["gpu"]["framework_overhead_bytes"] = v1["gpu"]["context_bytes"]  # one figure in v1
        for key in OUTSIDE_TENSOR_KEYS:
            del v1["gpu"][key]
        hf = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
              "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256,
              "max_position_embeddings": 64}
        self.docs = {"spec": spec, "hf": hf, "profile": profile, "profile_v1": v1,
                     "mesh_profile": load_profile("v100-16g").to_dict()}
        self.valid = {k: self._write(f"valid_{k}.json", json.dumps(v)) for k, v in
                      self.docs.items()}
        self.measured = None
        if measured_fixture.is_file():
            measured = json.loads(measured_fixture.read_text())
            self.docs["measured"], self.docs["mplan"] = measured, measured["plan"]
            for k in ("measured", "mplan"):
                self.valid[k] = self._write(f"valid_{k}.json", json.dumps(self.docs[k]))
        self.valid["hostfile"] = self._write("hosts.txt", "node1 slots=8\n")
        self._special()

    def add_plan(self, path: Path) -> None:
        self.valid["plan"] = str(path)
        self.docs["plan"] = json.loads(path.read_text())

    def _write(self, name: str, text, mode: str = "w") -> str:
        path = self.root / name
        with open(path, mode) as f:
            f.write(text)
        return str(path)

    def _special(self) -> None:
        fifo = self.root / "fifo"
        os.mkfifo(fifo)
        big = self.root / "huge.json"
        with open(big, "wb") as f:
            f.truncate(80 * 2**20)  # sparse: over the input size cap, without the disk
        loop = self.root / "loop.json"
        os.symlink(loop, loop)
        (self.root / "adir.json").mkdir()
        self.inputs = [str(fifo), "/dev/zero", "/dev/null", "/proc/self/mem", str(big),
                       str(loop), str(self.root / "adir.json"), str(self.root / "missing.json"),
                       "x" * 5000 + ".json", str(self.root / ("y" * 300 + ".json")),
                       "a\nb.json", "a\x00b.json", self._write("empty.json", "")]
        self.outputs = [str(fifo), "/dev/full", "/dev/null", "/proc/self/mem",
                        str(self.root / "adir.json"), str(self.root / "no" / "such" / "o.json"),
                        "x" * 5000 + ".json", str(self.root / ("z" * 300 + ".json")),
                        str(loop), "", str(self.root)]

    def new_output(self, suffix: str = ".json") -> str:
        self.count += 1
        return str(self.root / f"out{self.count}{suffix}")

    def mutant(self, kind: str, rng: random.Random) -> str:
        """A broken copy of the valid `kind` file (or a special path, 1 time in 8)."""
        if rng.random() < 0.125:
            return rng.choice(self.inputs)
        self.count += 1
        name = f"m{self.count}.json"
        if kind == "hostfile":
            return self._write(name, rng.choice(["", "\n\n", "node1 slots=x\n", "a b c d\n",
                                                 "-bad\n", "node1 slots=99999999999\n",
                                                 "x" * 100000, "n\x00\n", "node1\n" * 5000]))
        return self._write(name, _broken_text(self.docs[kind], rng), "wb")


def _paths(doc, prefix=()):
    """Every (path, container) position of a JSON document."""
    out = [prefix]
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) \
        else ()
    for k, v in items:
        out += _paths(v, prefix + (k,))
    return out


def _mutated(doc, rng: random.Random):
    doc = json.loads(json.dumps(doc))
    path = rng.choice(_paths(doc)[1:] or [()])
    if not path:
        return rng.choice(BAD_VALUES)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key, op = path[-1], rng.random()
    if op < 0.3 and isinstance(parent, dict):
        del parent[key]
    elif op < 0.4 and isinstance(parent, dict):
        parent[rng.choice(["colour", "num_gpus ", "Gpu", ""])] = 1
    elif op < 0.55:
        parent[key] = RAW
    else:
        parent[key] = rng.choice(BAD_VALUES)
    return doc


def _broken_text(doc, rng: random.Random) -> bytes:
    op = rng.random()
    if op < 0.8:
        text = json.dumps(_mutated(doc, rng)).replace(f'"{RAW}"', rng.choice(RAW_TOKENS), 1)
        return text.encode()
    text = json.dumps(doc)
    n = rng.choice([100, 1000, 100000])
    return rng.choice([
        text[:rng.randrange(len(text))].encode(),
        b"\xef\xbb\xbf" + text.encode(), b"\xff\xfe" + text.encode("utf-16-le"),
        ("[" * n + "]" * n).encode(), ('{"a":' * n + "1" + "}" * n).encode(),
        b"null", b"[]", b"1", b'"x"', text.encode() + b" trailing", b"\x00" * 64])


# The valid invocation each case breaks; {kind} is an input file slot, {out}/{out.png} an output.
BASES = {
    "estimate": "estimate --model {spec} --cluster {profile} --global-batch 16 --seq-len 64 "
                "--precision fp32 --dp 2 --tp 2 --pp 2 --micro-batch 2 --zero 1 --json "
                "--out {out}",
    "estimate-plan": "estimate --plan {plan} --json",
    "estimate-hf": "estimate --model {hf} --cluster {profile_v1} --global-batch 8 --seq-len 64 "
                   "--precision fp32 --dp 8 --json",
    "estimate-mesh": "estimate --model tiny --cluster {mesh_profile} --global-batch 16 "
                     "--seq-len 64 --precision fp16 --dp 2 --tp 4 --json",
    "suggest": "suggest --model {spec} --cluster {profile} --global-batch 8 --seq-len 64 "
               "--precision fp32 --top 3 --json --out {out}",
    "simulate": "simulate {plan} --json --out {out}",
    "simulate-flags": "simulate --model {spec} --cluster {profile} --global-batch 16 --seq-len 64 "
                      "--precision fp32 --dp 2 --pp 4 --micro-batch 2 --zero 2 --json",
    "export": "export {plan} --to torchrun --nodes-hostfile {hostfile} --out {out}",
    "export-slurm": "export {plan} --to slurm --job-name fuzz --partition gpu --time 1:00:00",
    "export-deepspeed": "export {plan} --to deepspeed --out {out}",
    "compare": "compare {mplan} {measured} --json",
    "calibrate": "calibrate {measured} --profile {profile} --out {out}",
    "models": "models --json",
    "profiles": "profiles --json",
    "run": "run {plan} --steps 3 --measured {out}",
    "profile": "profile --base {profile} --out {out} --ranks 2",
}
SLOTS = ("spec", "hf", "profile", "profile_v1", "mesh_profile", "plan", "mplan", "measured",
         "hostfile")


def _option_table():
    """{command: [(flag, takes_value)]} read from the real parser, so every flag is fuzzed."""
    sub = next(a for a in build_parser()._actions if a.choices and isinstance(a.choices, dict))
    return {name: [(opt, a.nargs != 0) for a in p._actions for opt in a.option_strings
                   if opt.startswith("--") and opt != "--help"]
            for name, p in sub.choices.items()}


def _resolve(token: str, files: Files, broken: set, rng: random.Random) -> str:
    if token.startswith("{") and token.endswith("}"):
        slot = token[1:-1]
        if slot == "out":
            return rng.choice(files.outputs) if slot in broken else files.new_output()
        return files.mutant(slot, rng) if slot in broken else files.valid[slot]
    return token


def _flag_mutation(argv: list, options: list, rng: random.Random) -> list:
    op = rng.random()
    flags = [i for i, a in enumerate(argv) if a.startswith("--")]
    if op < 0.45 and flags:  # a flag's value (or the flag itself) replaced by a bad token
        i = rng.choice(flags)
        j = i + 1 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else i
        return argv[:j] + [rng.choice(BAD_TOKENS)] + argv[j + 1:]
    if op < 0.6 and flags:  # a flag dropped, with its value
        i = rng.choice(flags)
        j = i + 2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else i + 1
        return argv[:i] + argv[j:]
    if op < 0.9 and options:  # any flag of the command added (or repeated) with a bad value
        flag, takes = rng.choice(options)
        return argv + ([flag, rng.choice(BAD_TOKENS)] if takes else [flag])
    return argv + rng.choice([["--no-such-flag"], ["junk"], ["--", "x"], ["-x"], ["--debu"]])


def generate(files: Files, per_base: dict, seed: int = SEED):
    """(base name, argv) cases, deterministic for a seed."""
    options = _option_table()
    for name, count in per_base.items():
        rng = random.Random(f"{seed}:{name}")  # each base's cases independent of the others
        template = BASES[name].split()
        slots = [t[1:-1] for t in template if t.startswith("{")]
        if any(s in SLOTS and s not in files.valid for s in slots):
            continue  # an input this checkout lacks (the measured.json fixture)
        for _ in range(count):
            broken = set()
            if slots and rng.random() < 0.55:
                broken.add(rng.choice(slots))
            argv = [_resolve(t, files, broken, rng) for t in template]
            if not broken or rng.random() < 0.3:
                argv = _flag_mutation(argv, options[argv[0]], rng)
            yield name, argv


# Findings in files other work owns, kept out of the contract until fixed there: each names the
# file and the fix, and the fuzz still counts its cases.  Remove an entry once its count is 0.
# (label, reason, does it match this (argv, stderr, files)?, run it at all?)
OPEN_FINDINGS = [
]


def open_finding(argv: list, err, files: Files):
    """The OPEN_FINDINGS entry this case belongs to (err None: before running it), or None."""
    for entry in OPEN_FINDINGS:
        label, _, matches, run = entry
        if (err is None and not run or err is not None) and matches(argv, err or "", files):
            return entry
    return None


class _Hang(BaseException):
    """Raised by the alarm; not an Exception, so main() cannot swallow it."""


def invoke(argv: list, limit_s: float = HANG_S) -> tuple:
    """(exit code or 'hang' / 'escaped:<Type>', stdout, stderr, seconds) of main(argv)."""
    out, err = io.StringIO(), io.StringIO()

    def alarm(*_):
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as exc:
                code = exc.code
    except _Hang:
        code = "hang"
    except BaseException as exc:  # noqa: BLE001 - anything escaping main() is a finding
        code = f"escaped:{type(exc).__name__}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - start


def _strict(token):
    raise ValueError(f"{token} in --json output")


def verdict(argv: list, code, out: str, err: str) -> str:
    """'' when the case keeps the contract, else what it broke."""
    if code == "hang" or str(code).startswith("escaped"):
        return str(code)
    if code == 2:
        lines = err.strip().splitlines()
        if "Traceback" in err or "--debug shows the traceback" in err:
            return "traceback"
        return "" if len(lines) == 1 and lines[0] else f"stderr has {len(lines)} lines"
    if code == 0:
        if "--json" in argv and not {"-h", "--help", "--version"} & set(argv):
            try:
                json.loads(out, parse_constant=_strict)
            except ValueError as exc:
                return f"exit 0 without strict JSON ({str(exc)[:60]})"
        return ""
    return f"exit code {code!r}"
