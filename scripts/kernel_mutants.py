#!/usr/bin/env python3
"""Mutation testing of the CUDA kernel sources through the emulator's tests.

cargo-mutants reads only Rust, so the kernels (crates/model/kernels/*.cu) get their mutants here:
one small operator change per mutant (a comparison's boundary, && and ||, & and |, a shift's
direction, += and -=, min and max, fmaxf and fminf, a barrier removed; with --arith also + - *),
each compiled into the emulator and run against `cargo test -p patchlm-model --test emulated`.
A mutant the tests pass "survived": either the tests miss something or the change makes no
difference. The file is changed in place and put back from git HEAD after each mutant (also on
SIGTERM or Ctrl-C), so run it in a checkout of its own (and a target directory of its own:
CARGO_TARGET_DIR). Results go to --log as JSON lines; a second run with the same log skips the
mutants already there.

    python3 scripts/kernel_mutants.py crates/model/kernels/fused.cu --log fused.jsonl \
        [--sanitize] [--arith] [--list] [--lines 700-900] [--shard 0/2] -- --skip flash --skip wgmma

Arguments after `--` go to the test binary (which tests run). --sanitize sets
PATCHLM_EMU_SANITIZE=1 (AddressSanitizer and UBSan: reads past buffers and arrays; about 2.5x
slower). docs/checks.md has the results of the runs so far.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

RULES = [
    (r" < ", " <= ", "rel"), (r" <= ", " < ", "rel"), (r" > ", " >= ", "rel"), (r" >= ", " > ", "rel"),
    (r" == ", " != ", "rel"), (r" != ", " == ", "rel"),
    (r" && ", " || ", "logic"), (r" \|\| ", " && ", "logic"),
    (r" \+= ", " -= ", "assign"), (r" -= ", " += ", "assign"),
    (r"\bfmaxf\(", "fminf(", "fn"), (r"\bfminf\(", "fmaxf(", "fn"), (r"\bmin\(", "max(", "fn"), (r"\bmax\(", "min(", "fn"),
    (r" >> ", " << ", "shift"), (r" << ", " >> ", "shift"),
    (r" & ", " | ", "bit"), (r" \| ", " & ", "bit"),
]
ARITH = [(r" \+ ", " - ", "arith"), (r" - ", " + ", "arith"), (r" \* ", " / ", "arith")]


def mutants(text, arith):
    """Every mutant of `text`: dicts of id, line (1-based), before, after, kind. Comment and
    preprocessor lines are left alone, and the code part of a line only."""
    rules = RULES + (ARITH if arith else [])
    out = []
    for no, raw in enumerate(text.split("\n"), 1):
        s = raw.lstrip()
        if not s or s.startswith(("//", "#", "*")):
            continue
        code = raw.split("//")[0]
        if "__syncthreads();" in code:
            out.append((no, raw, raw.replace("__syncthreads();", ";", 1), "sync"))
        elif "__syncwarp(" in code:
            out.append((no, raw, re.sub(r"__syncwarp\([^)]*\);", ";", raw, count=1), "sync"))
        for pat, rep, kind in rules:
            for m in re.finditer(pat, code):
                out.append((no, raw, raw[: m.start()] + rep + raw[m.end():], kind))
    return [{"id": i + 1, "line": no, "before": b, "after": a, "kind": k} for i, (no, b, a, k) in enumerate(out)]


def pair(text, sep, flag, form):
    """Two integers written `a<sep>b`, or an exit that names the flag and the form it takes."""
    parts = text.split(sep)
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        sys.exit(f"{flag} {text}: give {form}")
    return int(parts[0]), int(parts[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="arguments after -- go to the test binary")
    ap.add_argument("file", help="a kernel source, relative to the repository root")
    ap.add_argument("--log", required=True, help="JSON lines out (appended; ids there are skipped)")
    ap.add_argument("--sanitize", action="store_true", help="build the emulator with ASan and UBSan")
    ap.add_argument("--arith", action="store_true", help="also + - * mutants (many more)")
    ap.add_argument("--list", action="store_true", help="print the mutants and stop")
    ap.add_argument("--timeout", type=int, default=300, help="seconds a mutant may take (a hang counts as caught)")
    ap.add_argument("--lines", help="only mutants on these lines of the file: FIRST-LAST (1-based, inclusive)")
    ap.add_argument("--shard", help="I/N: only every N-th mutant from the I-th (0-based), to split a run between checkouts")
    argv = sys.argv[1:]
    test_args = argv[argv.index("--") + 1:] if "--" in argv else []
    a = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    path = os.path.join(root, a.file)
    orig = subprocess.run(["git", "show", "HEAD:" + a.file], cwd=root, capture_output=True, text=True, check=True).stdout
    ms = mutants(orig, a.arith)
    if a.lines:
        first, last = pair(a.lines, "-", "--lines", "FIRST-LAST, as 700-900")
        ms = [m for m in ms if first <= m["line"] <= last]
    if a.shard:
        i, n = pair(a.shard, "/", "--shard", "I/N with 0 <= I < N, as 0/2")
        if not 0 <= i < n:
            sys.exit(f"--shard {a.shard}: give I/N with 0 <= I < N, as 0/2")
        ms = ms[i::n]
    if a.list:
        for m in ms:
            print(json.dumps(m))
        return
    done = set()
    if os.path.exists(a.log):
        with open(a.log) as f:
            done = {json.loads(line)["id"] for line in f if line.strip()}

    def restore(*_):
        with open(path, "w") as f:
            f.write(orig)

    def stop(*_):
        restore()
        sys.exit(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    env = dict(os.environ, RUST_BACKTRACE="0")
    if a.sanitize:
        env["PATCHLM_EMU_SANITIZE"] = "1"
    lines = orig.split("\n")
    counts = {}
    try:
        for m in ms:
            if m["id"] in done:
                continue
            new = list(lines)
            new[m["line"] - 1] = m["after"]
            with open(path, "w") as f:
                f.write("\n".join(new))
            t0 = time.time()
            cmd = ["timeout", str(a.timeout), "cargo", "test", "-q", "-p", "patchlm-model", "--test", "emulated", "--"]
            p = subprocess.run(cmd + test_args, cwd=root, env=env, capture_output=True, text=True)
            restore()
            status = "survived" if p.returncode == 0 else "timeout" if p.returncode == 124 else "killed"
            failed = [x.split()[0] for x in (p.stdout + p.stderr).split("\n") if x.startswith("    emulated_")]
            m.update(status=status, secs=round(time.time() - t0, 1), failed=failed)
            with open(a.log, "a") as f:
                f.write(json.dumps(m) + "\n")
            counts[status] = counts.get(status, 0) + 1
            print(f"{m['id']}/{len(ms)} line {m['line']} {m['kind']}: {status}", flush=True)
    finally:
        restore()
    print(counts)


if __name__ == "__main__":
    main()
