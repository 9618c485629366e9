#!/usr/bin/env python3
"""Side-by-side curves of training runs, as one text table.

    scripts/compare-runs.py [--every K] RUN_DIR...

Each RUN_DIR is a run directory (runs/experiments/NAME, runs/latest) or a result directory
(docs/results/NAME): anything holding a metrics.jsonl. For each test evaluation generation
that is a multiple of K (default 500), it prints every run's test accuracy, wall time and
batch at that generation, and the last line of each run (which may still be training).
Runs that shared the cores compare fairly by generation, not by wall time.

Standard library only.
"""
import json
import os
import sys


def load(run_dir):
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def main(argv):
    every = 500
    if len(argv) >= 2 and argv[0] == "--every":
        every = int(argv[1])
        argv = argv[2:]
    if not argv:
        sys.exit(__doc__)
    runs = {os.path.basename(os.path.normpath(d)): load(d) for d in argv}
    tests = {name: {r["generation"]: r for r in rows if "test_accuracy" in r}
             for name, rows in runs.items()}
    generations = sorted({g for t in tests.values() for g in t if (g + 1) % every == 0 or g % every == 0})
    names = list(runs)
    width = max(len(n) for n in names) + 2
    print("generation".ljust(12) + "".join(n.rjust(width + 12) for n in names))
    for g in generations:
        cells = []
        for n in names:
            r = tests[n].get(g)
            cells.append((f"{100 * r['test_accuracy']:.2f}% {r['wall_secs']:7.0f}s" if r else "—")
                         .rjust(width + 12))
        print(str(g).ljust(12) + "".join(cells))
    print()
    for n, rows in runs.items():
        last = rows[-1]
        print(f"{n}: last generation {last['generation']} at {last['wall_secs']:.0f} s, "
              f"batch accuracy {100 * last.get('batch_accuracy', float('nan')):.1f}%, "
              f"lr {last.get('lr', float('nan')):.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
