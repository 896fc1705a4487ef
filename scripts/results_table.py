#!/usr/bin/env python
"""Regenerate the top README's results table from the studies' row files (readme_row.json, written by
scripts/study.py), between the markers <!-- results-table:start --> and <!-- results-table:end -->;
results/faster_or_better.md, one row per pair of every decomposition.csv under results/ and experiments/
(docs/STUDIES.md §3b's four effects side by side, dopr.analysis.decomposition.effects_table); and every
study table a README includes: a block

    <!-- include: results/lds_anisotropy/cond1e6/headline.md -->
    ...
    <!-- /include -->

in README.md or experiments/*/README.md is replaced by that file (a path from the repo root), so no
number in them is typed by hand.

    python scripts/results_table.py                       # rows from results/**/readme_row.json into README.md
    python scripts/results_table.py check=true            # exit 1 if README.md's table is out of date
    python scripts/results_table.py readme=README.md rows=results experiments=experiments
    python scripts/results_table.py help
"""

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dopr.analysis.markdown import markdown_table
from dopr.cli import parse_script_args

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
INCLUDE = re.compile(r"(<!-- include: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /include -->)", re.S)


@dataclass
class ResultsTableArgs:
    readme: str = "README.md"
    rows: str = "results"
    check: bool = False
    experiments: str = str(ROOT / "experiments")


def fill_includes(text: str, where: Path, root: Path = ROOT) -> str:
    """Every include block of ``text`` with the current content of the file it names (from ``root``)."""
    def body(match: re.Match) -> str:
        path = root / match["path"]
        if not path.is_file():
            raise SystemExit(f"{where}: includes {match['path']}, which does not exist; run scripts/study.py first")
        content = path.read_text()
        return f"{match[1]}{content if content.endswith(chr(10)) else content + chr(10)}{match[4]}"

    return INCLUDE.sub(body, text)


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


EFFECTS_HEADER = (
    "# Faster, or better? Every pair's four effects (docs/STUDIES.md §3b)\n\n"
    "Written by `python scripts/results_table.py` from each study's `decomposition.csv` (its "
    "`decomposition.md` has the per-seed detail and the pooled matched-loss comparison). \"converged?\": the "
    "base's val/loss moved under 5% over its last quarter on every seed; every other row is budget-limited "
    "and its effects hold within that budget only. Intervals are 95% over verdict seeds, DoPr − base.\n\n")


def effects(dirs: list[Path], out: Path) -> str:
    """results/faster_or_better.md's text: every decomposition.csv under ``dirs``, linked from ``out``'s folder."""
    from dopr.analysis.decomposition import effects_table

    found = sorted({path for d in dirs for path in d.rglob("decomposition.csv")})
    studies = [(str(path.parent.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path.parent),
                os.path.relpath(path.parent, out.parent), pd.read_csv(path)) for path in found]
    return EFFECTS_HEADER + effects_table(studies)


def main(argv: list[str] | None = None) -> int:
    args = parse_script_args(sys.argv[1:] if argv is None else argv, ResultsTableArgs, __doc__)
    readme, rows_dir = Path(args.readme), Path(args.rows)
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{readme} needs one {START} line and one {END} line after it, around the results table")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    updates = {readme: fill_includes(f"{head}{START}\n{table(rows_dir, readme)}{END}{tail}", readme)}
    for other in sorted(Path(args.experiments).glob("*/README.md")):
        updates[other] = fill_includes(other.read_text(), other)
    summary = rows_dir / "faster_or_better.md"
    updates[summary] = effects([rows_dir, Path(args.experiments)], summary)
    stale = [path for path, new in updates.items() if not path.exists() or new != path.read_text()]
    if args.check:
        for path in stale:
            print(f"{path}: a generated table is out of date; run python scripts/results_table.py")
        return 1 if stale else 0
    for path in stale:
        path.write_text(updates[path])
    print(f"wrote the results table of {readme} from {rows_dir}/**/readme_row.json and the included study tables "
          f"({len(stale)} file(s) changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
