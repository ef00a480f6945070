#!/usr/bin/env python3
"""Every criterion id of the last run as one Markdown table: group, id, median time with its
95 % confidence interval, and the throughput where the bench declares one.

    python3 scripts/criterion-summary.py target/criterion > criterion.md

Reads each `<group>/<id>/new/benchmark.json` (names, throughput) and `estimates.json` (times in
ns) that criterion writes; nothing else.
"""
import json
import sys
from pathlib import Path


def human_time(ns: float) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def throughput(bench: dict, median_ns: float) -> str:
    declared = bench.get("throughput") or {}
    for kind, unit in (("Elements", "items/s"), ("Bytes", "B/s"), ("BytesDecimal", "B/s")):
        if kind in declared:
            return f"{declared[kind] / (median_ns / 1e9):,.1f} {unit}"
    return ""


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(sys.argv[1])
    rows = []
    for bench_file in sorted(root.glob("**/new/benchmark.json")):
        bench = json.loads(bench_file.read_text())
        estimates = json.loads((bench_file.parent / "estimates.json").read_text())
        median = estimates["median"]
        low, high = median["confidence_interval"]["lower_bound"], median["confidence_interval"]["upper_bound"]
        rows.append((
            bench["group_id"],
            bench.get("full_id", bench["group_id"]).removeprefix(bench["group_id"] + "/"),
            human_time(median["point_estimate"]),
            f"{human_time(low)} – {human_time(high)}",
            throughput(bench, median["point_estimate"]),
        ))
    if not rows:
        print(f"no criterion results under {root}", file=sys.stderr)
        return 1
    print("| group | id | median | 95 % interval | throughput |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(f"`{c}`" if i < 2 else c for i, c in enumerate(row)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
