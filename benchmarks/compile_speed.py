"""Compile time of every library spec on a model (default vit_b16), target < 1 s each.

    .venv/bin/python benchmarks/compile_speed.py [--model vit_b16] [--repeat 5] [--device meta|cpu]
    .venv/bin/python benchmarks/compile_speed.py --model vit_gigantic_patch14_224
    .venv/bin/python benchmarks/compile_speed.py --model vit_b16 --depths 12 24 48 --specs lora ssf

``--model`` takes a utdsl alias or any timm name; a spec the model refuses is listed with its
first error line and left out of the slowest time. ``--depths`` builds the model at each depth
(timm's ``depth=``) and shows the time per insertion, which stays flat when compile time is
linear in the number of insertions.

Times ``utdsl.compile`` alone (model construction excluded), after one untimed compile of each
spec: the median and the min-max of ``--repeat`` runs. ``--clock cpu`` (default) is the process's
CPU time, which other processes on a shared host disturb far less than wall time (``--clock
wall``); a compile runs on one thread. ``--device cpu`` builds real weights, so the time includes
copying the base model (compile never mutates the caller's model); ``meta`` times the compiler.
"""

from __future__ import annotations

import argparse
import statistics
import time

import utdsl
from utdsl.library import library_specs
from utdsl.runtime.models import create_model


def time_spec(spec, model, repeat: int, clock) -> tuple[list[float], int]:
    """Seconds of ``repeat`` compiles (after one untimed), and the number of insertions."""
    tuned = utdsl.compile(spec, model)
    times = []
    for _ in range(repeat):
        start = clock()
        utdsl.compile(spec, model)
        times.append(clock() - start)
    return times, len(tuned.meta["utdsl"].plan.insertions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b16")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="meta", choices=["meta", "cpu", "cuda"])
    parser.add_argument("--specs", nargs="*", help="library spec names (default: all)")
    parser.add_argument("--depths", nargs="*", type=int, help="build the model at these depths (timm depth=)")
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"], help="process CPU time or wall time")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    specs = [p for p in library_specs() if not args.specs or p.stem in args.specs]
    depths = args.depths or [None]
    models = {d: create_model(args.model, device=args.device, **({} if d is None else {"depth": d})).eval()
              for d in depths}
    what = f"{args.model}, {args.device}, {args.clock} time, median (min-max) of {args.repeat}"
    if args.depths:
        print(f"| spec | " + " | ".join(f"depth {d}: s (insertions, ms each)" for d in depths) + " |")
        print("|---|" + "---:|" * len(depths))
    else:
        print(f"| spec | compile s ({what}) | insertions |")
        print("|---|---:|---:|")
    worst, worst_name = 0.0, ""
    for path in specs:
        spec = utdsl.load_spec(path)
        cells = []
        for depth, model in models.items():
            try:
                times, insertions = time_spec(spec, model, args.repeat, clock)
            except utdsl.UtdslError as error:
                cells.append(f"refused: {str(error).splitlines()[0][:90]}")
                continue
            median = statistics.median(times)
            if median > worst:
                worst, worst_name = median, path.stem
            timing = f"{median:.3f} ({min(times):.3f}-{max(times):.3f})"
            cells.append(f"{median:.3f} ({insertions}, {1000 * median / max(insertions, 1):.1f})"
                         if args.depths else f"{timing} | {insertions}")
        print(f"| {path.stem} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{what}; slowest: {worst:.3f} s ({worst_name}), target < 1 s: {'PASS' if worst < 1.0 else 'FAIL'}")


if __name__ == "__main__":
    main()
