"""Print the family x placement matrix (README table) by compiling each cell.

    .venv/bin/python scripts/family_matrix.py [--families vit resnet ...] [--json]

Each cell compiles the family's spec for that column into a small model and checks it (see
tests/families.py): `works`, or the UtdslError's reason. A `defect` is a bug to fix.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from tests.families import COLUMNS, FAMILIES, run_cell  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--columns", nargs="*", default=list(COLUMNS))
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    results = {name: {column: run_cell(name, column) for column in options.columns} for name in options.families}
    if options.json:
        print(json.dumps({n: {c: [o.kind, o.detail] for c, o in row.items()} for n, row in results.items()}, indent=1))
        return
    print("| family | " + " | ".join(options.columns) + " |")
    print("|---|" + "---|" * len(options.columns))
    for name, row in results.items():
        cells = [("works" if o.kind == "works" else f"**{o.kind}**: {o.detail}") for o in row.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
