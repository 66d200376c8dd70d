"""Collect an ablation: several short runs of one script, one setting changed each, compared at equal steps.

Reads each run folder's metrics.jsonl (the validation rows a training writes) and ckpt.pt (its settings), names
each run by the settings in which it differs from the first (the baseline), and writes one JSON and a markdown
table. The numbers are the runs' own validation rows: val_W (1000 generated validation samples) and val_loss.

    python tools/ablation.py runs/abl_fm/base runs/abl_fm/ema0 ... --json results/flow_matching_ablation_cpu.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch

IGNORE = {"out", "ckpt", "resume", "train", "eval", "sample", "plot", "ckpt_every"}


def load(folder):
    folder = Path(folder)
    rows_path, ckpt_path = folder / "metrics.jsonl", folder / "ckpt.pt"
    if not rows_path.exists() or not ckpt_path.exists():
        sys.exit(f"{folder}: needs metrics.jsonl and ckpt.pt (a finished --train run folder)")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    args = torch.load(ckpt_path, map_location="cpu", weights_only=False)["args"]
    return rows, args


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders; the first is the baseline")
    p.add_argument("--json", help="write the collected rows here")
    a = p.parse_args(argv)
    runs = [(Path(r), *load(r)) for r in a.runs]
    base_args = runs[0][2]
    out = []
    for folder, rows, args in runs:
        diff = {k: v for k, v in args.items() if k not in IGNORE and base_args.get(k) != v}
        out.append(dict(run=str(folder), changed=diff,
                        val=[{k: r.get(k) for k in ("step", "val_W", "val_loss", "minutes")} for r in rows]))
    steps = sorted({v["step"] for r in out for v in r["val"]})
    print("| run | changed | " + " | ".join(f"val W @ {s}" for s in steps) + " | val loss @ end |")
    print("|---|---|" + "---|" * len(steps) + "---|")
    for r in out:
        by_step = {v["step"]: v for v in r["val"]}
        cells = [f"{by_step[s]['val_W']:.2f}" if s in by_step and by_step[s]["val_W"] is not None else "-" for s in steps]
        changed = ", ".join(f"{k}={v}" for k, v in r["changed"].items()) or "(baseline)"
        print(f"| {Path(r['run']).name} | {changed} | " + " | ".join(cells) + f" | {r['val'][-1]['val_loss']:.4f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(command="python tools/ablation.py " + " ".join(a.runs), runs=out),
                                           indent=1) + "\n")
        print(f"written {a.json}")


if __name__ == "__main__":
    main()
