"""Probe (issue 21): how flow_matching.py's samplers shape the showers, feature by feature.

For the first N test events of a checkpoint's split, prints the 10 / 50 / 90 % quantiles of four shower features
(photon sum, width x, brightest pixel, lit pixels) of the data and of each sampler's output, the share of the
generated photons that sit below half a photon (the sub-photon haze), the channel-sum W and the width-x
separation power (metrics.py's definitions):

    python tools/sampler_features.py --ckpt runs/fm_2x/ckpt.pt [--n 2000] [--samplers euler11,midpoint4,midpoint4r]

A sampler is SOLVER + STEPS, with a trailing `r` for whole photons (--rounding nearest). One draw per sampler
(seed 0): a quick look, not an evaluation (that is --eval).
"""
import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import flow_matching as fm  # noqa: E402
import metrics  # noqa: E402

SHOWN = {"sum": 0, "width_x": 8, "max_px": 10, "n_lit": 11}     # columns of metrics.shower_features


def parse(spec):
    m = re.fullmatch(r"(euler|midpoint)(\d+)(r?)", spec)
    if not m or int(m[2]) < 1:
        raise ValueError(spec)
    return m[1], int(m[2]), "nearest" if m[3] else "none"


def row(tag, f):
    q = lambda v: " ".join(f"{x:7.2f}" for x in np.quantile(v, [0.1, 0.5, 0.9]))
    return f"{tag:<12} " + " | ".join(f"{k} {q(f[:, i])}" for k, i in SHOWN.items())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=2000, help="first N test events")
    p.add_argument("--samplers", default="euler11,midpoint4,midpoint4r", help="comma-separated SOLVER STEPS [r]")
    a = p.parse_args(argv)
    try:
        samplers = [parse(s) for s in a.samplers.split(",")]
    except ValueError as e:
        p.error(f"--samplers: {e} is not SOLVER STEPS [r], e.g. euler11 or midpoint4r")
    try:
        ck = data.load_checkpoint(a.ckpt, "flow_matching")
        args = fm.get_args(["--eval", "--ckpt", a.ckpt, "--device", "cpu"])
        model = fm.load_sampler(ck, args, torch.device("cpu")).model.eval()
    except data.DataError as e:
        sys.exit(f"error: {e}")
    split = data.split_from_checkpoint(ck)
    cond, true = split.cond("test")[:a.n], split.counts("test")[:a.n]
    ft = metrics.shower_features(true)
    print(f"{len(true)} test events of {a.ckpt}; quantiles 10 / 50 / 90 %")
    print(row("data", ft))
    for solver, steps, rounding in samplers:
        g = fm.sample(model, cond, ck["data"]["shape"], torch.Generator().manual_seed(0), steps, solver, rounding).numpy()
        fg = metrics.shower_features(g)
        haze = g[(g > 0) & (g < 0.5)].sum() / max(g.sum(), 1e-12)
        print(row(f"{solver}{steps}{'r' if rounding == 'nearest' else ''}", fg))
        print(f"{'':<12} haze {haze:.3f} of the photons, W {metrics.wasserstein(true, g)[0]:.3f}, "
              f"separation width_x {metrics.separation_power(ft[:, 8:9], fg[:, 8:9])[0]:.3f}")


if __name__ == "__main__":
    main()
