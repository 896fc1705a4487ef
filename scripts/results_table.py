#!/usr/bin/env python
"""Regenerate the top README's results table from the studies' row files (readme_row.json, written by
scripts/study.py), between the markers <!-- results-table:start --> and <!-- results-table:end -->.

    python scripts/results_table.py                       # rows from results/**/readme_row.json into README.md
    python scripts/results_table.py check=true            # exit 1 if README.md's table is out of date
    python scripts/results_table.py readme=README.md rows=results
    python scripts/results_table.py help
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

from dopr.analysis.report import markdown_table
from dopr.cli import is_true, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
KEYS = {"readme", "rows", "check"}


def table(rows_dir: Path, readme: Path) -> str:
    paths = sorted(rows_dir.rglob("readme_row.json"))
    if not paths:
        raise SystemExit(f"rows={rows_dir}: no readme_row.json under it; run scripts/study.py for each study first")
    rows = []
    for path in paths:
        row = json.loads(path.read_text())
        link = row.get("readme") or ""
        if link:  # row files name the README from the repo root; a link is relative to the README holding it
            link = os.path.relpath(ROOT / link, readme.resolve().parent)
        rows.append({"study": f"[{row['study']}]({link})" if link else row["study"], "claim": row["claim"],
                     "metric": f"`{row['metric']}`", "DoPr − base, 95% interval (verdict)": row["result"],
                     "seeds": row["seeds"]})
    return markdown_table(pd.DataFrame(rows))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("help", "-h", "--help"):
        print(__doc__)
        return 0
    args = parse_overrides(argv)
    unknown = sorted(set(args) - KEYS)
    if unknown:
        raise SystemExit(f"unknown key(s) {unknown}; known: {sorted(KEYS)}")
    readme, rows_dir = Path(args.get("readme", "README.md")), Path(args.get("rows", "results"))
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{readme} needs one {START} line and one {END} line after it, around the results table")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{table(rows_dir, readme)}{END}{tail}"
    if is_true(args.get("check", "false")):
        if new != text:
            print(f"{readme}: results table is out of date; run python scripts/results_table.py")
            return 1
        return 0
    readme.write_text(new)
    print(f"wrote the results table of {readme} from {rows_dir}/**/readme_row.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
