#!/usr/bin/env python3
"""Test accuracy against wall time for every run under docs/results/, as one SVG.

    scripts/plot-results.py [--generations] [RESULTS_DIR] [OUT.svg]

With --generations the x axis is the generation instead: θ does not depend on the machine's
load, so runs that shared the cores compare fairly there.

Reads each run's metrics.jsonl (the lines that carry `test_accuracy`) and summary.json (the
final accuracy, at the run's end), and draws one line per run. Standard library only, so it
runs on a fresh machine with no plotting package; the SVG is what docs/RESULTS.md shows.
"""
import json
import os
import sys

args = sys.argv[1:]
by_generation = "--generations" in args
args = [a for a in args if a != "--generations"]
results = args[0] if args else "docs/results"
default_name = "accuracy-vs-generation.svg" if by_generation else "accuracy-vs-time.svg"
out_path = args[1] if len(args) > 1 else os.path.join(results, default_name)


def x_of(d, offset=0.0):
    """Thousands of generations, or minutes (`offset`: seconds spent before a resume)."""
    return d["generations" if "generations" in d else "generation"] / 1000.0 if by_generation \
        else (offset + d["wall_secs"]) / 60.0


runs = []
for name in sorted(os.listdir(results)):
    metrics = os.path.join(results, name, "metrics.jsonl")
    if not os.path.isfile(metrics):
        continue
    points = []
    # A resumed run's process counts its wall time from 0 again: its lines continue after
    # the time the first process took to reach the checkpoint (the last line before it).
    offset, last_wall = 0.0, 0.0
    with open(metrics) as f:
        for line in f:
            d = json.loads(line)
            if d["wall_secs"] < last_wall:
                offset += last_wall
            last_wall = d["wall_secs"]
            if "test_accuracy" in d:
                # A test line is written after generation g's update: g + 1 generations done.
                d = dict(d, generation=d["generation"] + 1)
                points.append((x_of(d, offset), d["test_accuracy"] * 100.0))
    summary = os.path.join(results, name, "summary.json")
    if os.path.isfile(summary):
        s = json.load(open(summary))
        points.append((x_of(s, offset), s["test_accuracy"] * 100.0))
    if points:
        runs.append((name, sorted(points)))

if not runs:
    sys.exit(f"no run with test accuracies under {results}")

W, H = 860, 520
left, right, top, bottom = 70, 250, 30, 60
pw, ph = W - left - right, H - top - bottom
x_max = max(p[0] for _, pts in runs for p in pts)
unit = 1 if by_generation else 10
x_max = max(unit, (int(x_max / unit) + 1) * unit)
y_min, y_max = 50.0, 100.0


def sx(x):
    return left + pw * x / x_max


def sy(y):
    y = min(max(y, y_min), y_max)
    return top + ph * (1 - (y - y_min) / (y_max - y_min))


colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf"]
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
       f'font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>']
for y in range(int(y_min), int(y_max) + 1, 5):
    svg.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
               f'stroke="#ddd"/>')
    svg.append(f'<text x="{left - 8}" y="{sy(y) + 4:.1f}" text-anchor="end">{y}%</text>')
step = (1 if x_max <= 12 else 2) if by_generation else (10 if x_max <= 120 else 20)
for x in range(0, int(x_max) + 1, step):
    svg.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{top + ph}" '
               f'stroke="#eee"/>')
    svg.append(f'<text x="{sx(x):.1f}" y="{top + ph + 18}" text-anchor="middle">{x}</text>')
# The two targets are close: one label above its line, the other below.
for target, label, dy in ((96.7, "seed: 96.7%", 15), (98.0, "98%", -5)):
    svg.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(target):.1f}" '
               f'y2="{sy(target):.1f}" stroke="#444" stroke-dasharray="6,4"/>')
    svg.append(f'<text x="{left + 6}" y="{sy(target) + dy:.1f}" fill="#444">{label}</text>')
svg.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#000"/>')
x_label = "thousands of generations" if by_generation else \
    "wall time (minutes, this machine: 2 cores)"
svg.append(f'<text x="{left + pw / 2}" y="{H - 15}" text-anchor="middle">{x_label}</text>')
svg.append(f'<text transform="translate(18,{top + ph / 2}) rotate(-90)" '
           f'text-anchor="middle">MNIST test accuracy</text>')
for i, (name, pts) in enumerate(runs):
    c = colors[i % len(colors)]
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    svg.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
    ly = top + 14 + 18 * i
    svg.append(f'<line x1="{left + pw + 12}" x2="{left + pw + 32}" y1="{ly - 4}" y2="{ly - 4}" '
               f'stroke="{c}" stroke-width="3"/>')
    svg.append(f'<text x="{left + pw + 38}" y="{ly}">{name} ({pts[-1][1]:.2f}%)</text>')
svg.append("</svg>")
with open(out_path, "w") as f:
    f.write("\n".join(svg) + "\n")
print(f"wrote {out_path} ({len(runs)} runs)")
