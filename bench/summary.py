"""Mean and spread over seeds of every metric, for groups of run folders side by side.

    python bench/summary.py validation=bench/results/protocol2/default_seed{0,1,2} \
        evaluation=bench/results/protocol2/default_seed{0,1,2}_final

Each argument is NAME=RUN_DIR[,RUN_DIR...] or NAME=RUN_DIR followed by more run folders of the
same group (shell braces expand to those). For every metric of the registry that any group has,
one row: mean ± sample standard deviation over the group's runs (the runs' own 95% intervals
over episodes are in their metrics files), the registry's label and which way is better. Run
folders need only their metrics file (and run info, for the training time), so committed copies
of a run's small files are enough to reprint the README's tables.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from omnivae import rundir
from omnivae.registry import METRICS

SKIP = {"protocol_version", "split", "split_description", "test_images", "nll_k", "nll_images", "eval_seconds"}


def parse_groups(items: list[str]) -> dict[str, list[str]]:
    """NAME=DIR DIR DIR NAME2=DIR ... -> {NAME: [DIR, ...]}. A NAME given again adds to its group,
    so shell braces work: NAME=runs/x_seed{0,1,2} expands to NAME=runs/x_seed0 NAME=runs/x_seed1 ..."""
    groups: dict[str, list[str]] = {}
    current = None
    for item in items:
        name, sep, folder = item.partition("=")
        if sep and name and "/" not in name:
            current = name
            groups.setdefault(current, []).extend([folder] if folder else [])
        elif current is None:
            raise SystemExit(f"summary: {item!r} comes before any NAME=RUN_DIR")
        else:
            groups[current].append(item)
    return groups


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{np.mean(values):.4g} ± {np.std(values, ddof=1):.2g}"


def table(groups: dict[str, list[str]]) -> str:
    found = {}
    for name, folders in groups.items():
        runs = []
        for folder in folders:
            metrics = rundir.read_metrics(folder)
            if metrics is None:
                raise SystemExit(f"summary: {folder} holds no {rundir.METRICS_FILE}")
            info = rundir.read_run_info(folder) or {}
            runs.append({**metrics, **{k: info[k] for k in ("train_seconds",) if k in info}})
        found[name] = runs
    splits = {name: sorted({str(r.get("split")) for r in runs}) for name, runs in found.items()}
    header = ["metric", "key"] + [f"{name} ({len(found[name])} runs, split {'/'.join(splits[name])})" for name in found]
    header.append("better")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = [k for k in METRICS if k not in SKIP and METRICS[k].ci95_of is None] + ["train_seconds"]
    for key in keys:
        columns = [[float(r[key]) for r in runs if isinstance(r.get(key), (int, float))] for runs in found.values()]
        if not any(columns):
            continue
        record = METRICS.get(key)
        label = record.label if record else "training time (s)"
        better = (record.direction or "") if record else "lower"
        lines.append(f"| {label} | `{key}` | " + " | ".join(cell(c) for c in columns) + f" | {better} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("groups", nargs="+", help="NAME=RUN_DIR RUN_DIR ... (repeatable)")
    print(table(parse_groups(p.parse_args(argv).groups)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
