"""Probe (issue 21): evaluate a flow_matching.py checkpoint with its generated counts rounded to whole photons.

The toy's responses are integer photon counts; flow matching's 11-step sampler leaves a sub-photon haze over
every pixel. On ZP (median 2 photons per event) that haze carried 53 % of the generated photon sum. This runs
the script's own --eval with `sample` wrapped in round(), writing eval.json beside the checkpoint:

    python tools/round_probe.py --ckpt runs/fm_proton/ckpt.pt --max-test 2000     (any --eval flags)
    python tools/round_probe.py --stochastic --ckpt ...      # floor(x + u), u ~ U[0, 1): keeps the expected sum

It changes nothing in flow_matching.py: a measurement, to decide whether rounding belongs in the sampler.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import data  # noqa: E402
import flow_matching as fm  # noqa: E402


def main(argv):
    stochastic = "--stochastic" in argv
    argv = [a for a in argv if a != "--stochastic"]
    unrounded, g = fm.sample, torch.Generator().manual_seed(0)   # the uniforms' own seeded generator: reproducible

    def whole_photons(*a, **k):
        x = unrounded(*a, **k)
        return torch.floor(x + torch.rand(x.shape, generator=g).to(x)) if stochastic else x.round()
    fm.sample = whole_photons
    try:
        return fm.evaluate(fm.get_args(["--eval", *argv]))
    except data.DataError as e:
        sys.exit(f"error: {e}")
    finally:
        fm.sample = unrounded


if __name__ == "__main__":
    main(sys.argv[1:])
