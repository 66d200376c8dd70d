"""A fingerprint of every model script's `--train --smoke` run: the logged losses and a checksum of every saved
weight tensor. A refactor that is meant to leave the training numbers alone must leave this unchanged:

    python tools/smoke_trace.py --out tests/data/smoke_trace.json        # record (before a change)
    python tools/smoke_trace.py --check tests/data/smoke_trace.json      # compare (after it), to float tolerance

tests/test_skeleton.py runs the check, so a change of any script's training numbers is a deliberate one."""
import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["vae", "sae_ng", "gan", "sdigan_proton", "sdigan_joint", "vqgan", "ddpm", "flow_matching", "latent_fm",
           "corrvae"]
RUNS = SCRIPTS + [f"{s} --paper" for s in SCRIPTS]
SKIP = ("minutes", "seconds", "time", "epoch")   # wall-clock fields of metrics.jsonl; epoch is a function of step


def fingerprint(run):
    """{'log': numeric metrics.jsonl fields, 'weights': {entry: {tensor: [sum, abs sum]}}} of one run folder."""
    log = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        log.append({k: v for k, v in row.items() if isinstance(v, (int, float)) and not any(s in k for s in SKIP)})
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    w = {}
    for key, val in ck.items():
        if isinstance(val, dict) and val and all(torch.is_tensor(t) for t in val.values()):
            w[key] = {k: [float(t.double().sum()), float(t.double().abs().sum())] for k, t in val.items()
                      if t.is_floating_point()}
    return dict(log=log, weights=w)


def trace(run, workdir):
    """Train `run` ("SCRIPT" or "SCRIPT --flag ...") with --smoke and return its fingerprint."""
    script, *flags = run.split()
    out = Path(workdir) / run.replace(" ", "_")
    r = subprocess.run([sys.executable, f"{script}.py", "--train", "--smoke", *flags, "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{run}: --train --smoke failed:\n{r.stderr[-2000:]}")
    return fingerprint(out)


# A weight tensor's [sum, abs sum] may move by this share of its abs sum, a logged number by this share of
# itself: another CPU (SIMD width, reduction order) rounds differently, and 6 training steps grow that to
# 3.6e-3 (gan's conv.6.bias on an AMD EPYC against the recording machine; ddpm, latent_fm, vqgan ~3e-4). A
# changed method (other initial weights, another loss) moves them by far more (tests/test_skeleton.py).
WEIGHT_RTOL = 1e-2


def close(a, b, rtol=1e-2, atol=1e-5):
    return abs(a - b) <= atol + rtol * abs(b) or (math.isnan(a) and math.isnan(b))   # corrvae: NaN Spearman


def compare(got, want):
    """The differences between two fingerprints of one script, as lines (empty: the same run)."""
    bad = []
    if len(got["log"]) != len(want["log"]):
        bad.append(f"{len(got['log'])} log rows, recorded {len(want['log'])}")
    for i, (g, w) in enumerate(zip(got["log"], want["log"])):
        bad += [f"log row {i} {k}: {g.get(k)} vs {v}" for k, v in w.items()
                if v is not None and (g.get(k) is None or not close(g[k], v))]
    for entry, tensors in want["weights"].items():
        mine = got["weights"].get(entry, {})
        if set(mine) != set(tensors):
            bad.append(f"{entry}: tensors {sorted(set(mine) ^ set(tensors))[:5]} differ")
        bad += [f"{entry}.{k}: {mine[k]} vs {v}" for k, v in tensors.items()
                if k in mine and not all(abs(x - y) <= WEIGHT_RTOL * v[1] + 1e-4 for x, y in zip(mine[k], v))]
    return bad


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the fingerprints of every script to this JSON")
    p.add_argument("--check", help="compare every script with the fingerprints in this JSON")
    p.add_argument("--scripts", default=",".join(RUNS), help="comma-separated runs (default: every script, "
                   "default and --paper)")
    a = p.parse_args()
    scripts = a.scripts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        got = {s: trace(s, tmp) for s in scripts}
    if a.out:
        old = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({**old, **got}, indent=1) + "\n")
    if a.check:
        want = json.loads(Path(a.check).read_text())
        failed = False
        for s in scripts:
            bad = compare(got[s], want[s])
            print(f"{s}: {'same training numbers' if not bad else 'CHANGED'}")
            for line in bad[:10]:
                print("   ", line)
            failed |= bool(bad)
        sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
