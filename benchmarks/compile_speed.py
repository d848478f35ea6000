"""Compile time of every library spec on a model (default vit_b16), target < 1 s each.

    .venv/bin/python benchmarks/compile_speed.py [--model vit_b16] [--repeat 5] [--device meta|cpu]
    .venv/bin/python benchmarks/compile_speed.py --model vit_gigantic_patch14_224 --specs ssf lora

``--model`` takes a utdsl alias or any timm name; a spec the model refuses is listed with its
first error line and left out of the slowest time.

Times ``utdsl.compile`` alone (model construction excluded): the median of ``--repeat`` runs.
``--device cpu`` builds real weights, so the time includes copying the base model (compile
never mutates the caller's model); ``meta`` times the compiler itself.
"""

from __future__ import annotations

import argparse
import statistics
import time

import utdsl
from utdsl.library import library_specs
from utdsl.runtime.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b16")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="meta", choices=["meta", "cpu", "cuda"])
    parser.add_argument("--specs", nargs="*", help="library spec names (default: all)")
    args = parser.parse_args()
    model = create_model(args.model, device=args.device).eval()
    print(f"| spec | median compile time (s) on {args.model}, {args.device} | insertions |")
    print("|---|---:|---:|")
    worst = 0.0
    for path in library_specs():
        if args.specs and path.stem not in args.specs:
            continue
        spec = utdsl.load_spec(path)
        times, tuned = [], None
        try:
            for _ in range(args.repeat):
                start = time.perf_counter()
                tuned = utdsl.compile(spec, model)
                times.append(time.perf_counter() - start)
        except utdsl.UtdslError as error:
            print(f"| {path.stem} | refused: {str(error).splitlines()[0][:100]} | - |")
            continue
        median = statistics.median(times)
        worst = max(worst, median)
        print(f"| {path.stem} | {median:.3f} | {len(tuned.meta['utdsl'].plan.insertions)} |")
    print(f"\nslowest: {worst:.3f} s (target < 1 s): {'PASS' if worst < 1.0 else 'FAIL'}")


if __name__ == "__main__":
    main()
