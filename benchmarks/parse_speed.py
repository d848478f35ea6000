"""Front-end speed: parse + check of generated specs of 1k, 10k and 100k lines (target: 100k lines
in < 5 s), and their peak memory.

    .venv/bin/python benchmarks/parse_speed.py [--sizes 1000 10000 100000] [--lark]

Each size runs in a process of its own (a clean peak resident set). Times are process CPU
seconds (the machine may be shared); the line ``calibration`` gives the CPU time of a fixed pure
Python loop on this machine, to compare figures taken on different machines (about 0.4 s on an
idle desktop core). ``--lark`` also times the reference parser alone (``utdsl.parse`` without its
fast path), which the fast path must equal (``tests/test_parse_fast.py``).

The spec is realistic: a header, ``let`` bindings, and rules on varied module paths with chunks,
index ranges, groups, arithmetic arguments and comments, plus ``train``/``freeze`` lines.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

TARGET_LINES, TARGET_SECONDS = 100_000, 5.0


def make_spec(lines: int, seed: int = 0) -> str:
    """A generated spec of ``lines`` lines."""
    rnd = random.Random(seed)
    sites = ["attn.qkv{q, v}", "attn.proj", "mlp.fc1", "mlp.fc2", "attn", "mlp", "norm1", "mlp.fc1{0, 2 of 4}"]
    out = ['spec bench "generated for benchmarks/parse_speed.py"', "let r = 8", "let alpha = 2 * r",
           "let dim = 64"]
    while len(out) < lines:
        i = len(out)
        kind = rnd.randrange(10)
        stem = f"stage{i % 7}_{i}.blocks.{i % 24}"
        if kind < 6:
            out.append(f"{stem}.{rnd.choice(sites)} -> parallel lowrank(r={rnd.choice(['r', '4', '16'])}, "
                       f"alpha=alpha)")
        elif kind == 6:
            out.append(f"{stem}.mlp -> sequential adapter(dim=dim / {rnd.choice([2, 4])}, scale=0.1)  # adapter")
        elif kind == 7:
            out.append(f"layer{i}[0:{i % 12 + 1}, {i % 5}].(attn | mlp.fc{i % 2 + 1}) -> parallel lowrank(r=r)")
        elif kind == 8:
            out.append(f"train {stem}.**.bias")
        else:
            out.append(f"freeze ^stage{i}.norm_{i}")
    return "\n".join(out[:lines]) + "\n"


def _peak_reset() -> int:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak resident set (VmHWM) restarts from the current one
    return _status_kib("VmRSS")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def calibration() -> float:
    """CPU seconds of a fixed pure-Python loop: how fast this machine runs Python now."""
    start, total = time.process_time(), 0
    for i in range(10_000_000):
        total += i
    return time.process_time() - start


def worker(lines: int, lark: bool) -> dict:
    from utdsl.check import check
    from utdsl.errors import Source
    from utdsl.parse import _parse_with_lark, parse, parser

    parser()
    check(parse(make_spec(50)))  # imports and first-use caches outside the measurement
    text = make_spec(lines)
    base = _peak_reset()
    start = time.process_time()
    spec = parse(text, "bench.ut")
    parsed = time.process_time()
    check(spec)
    checked = time.process_time()
    row = {"lines": lines, "parse_s": parsed - start, "check_s": checked - parsed,
           "peak_mib": (_status_kib("VmHWM") - base) / 1024}
    if lark:
        del spec
        start = time.process_time()
        _parse_with_lark(text, Source(text, "bench.ut"))
        row["lark_parse_s"] = time.process_time() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10_000, TARGET_LINES])
    parser.add_argument("--lark", action="store_true", help="also time the reference (lark) parser")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.lark)))
        return
    print(f"calibration: a 10M-iteration Python loop takes {calibration():.2f} s CPU here "
          "(about 0.4 s on an idle desktop core)")
    header = "| lines | parse (s) | check (s) | total (s) | us/line | peak memory (MiB) |"
    print(header + (" lark parse (s) |" if args.lark else ""))
    print("|---:" * (6 + args.lark) + "|")
    rows = []
    for lines in args.sizes:
        command = [sys.executable, __file__, "--worker", str(lines)] + (["--lark"] if args.lark else [])
        row = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        rows.append(row)
        total = row["parse_s"] + row["check_s"]
        line = (f"| {lines:,} | {row['parse_s']:.2f} | {row['check_s']:.2f} | {total:.2f} | "
                f"{total / lines * 1e6:.0f} | {row['peak_mib']:.0f} |")
        print(line + (f" {row['lark_parse_s']:.2f} |" if args.lark else ""), flush=True)
    target = next((r for r in rows if r["lines"] == TARGET_LINES), None)
    if target is not None:
        total = target["parse_s"] + target["check_s"]
        print(f"\n{TARGET_LINES:,} lines parsed and checked in {total:.2f} s CPU (target < {TARGET_SECONDS:.0f} s): "
              f"{'PASS' if total < TARGET_SECONDS else 'FAIL'}")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth = ((last["parse_s"] + last["check_s"]) / (first["parse_s"] + first["check_s"])
                  / (last["lines"] / first["lines"]))
        print(f"time per line at {last['lines']:,} lines / at {first['lines']:,} lines: {growth:.2f} (1.0: linear)")


if __name__ == "__main__":
    main()
