"""Probe (issue 21): evaluate a checkpoint with its generated counts rounded to whole photons.

The toy's responses are integer photon counts; flow matching's 11-step sampler leaves a sub-photon haze over
every pixel. On ZP (median 2 photons per event) that haze carried 53 % of the generated photon sum. This runs
the script's own --eval with `sample` wrapped in round(), writing eval.json beside the checkpoint:

    python tools/round_probe.py --ckpt runs/fm_proton/ckpt.pt --max-test 2000     (any --eval flags)
    python tools/round_probe.py --stochastic --ckpt ...      # floor(x + u), u ~ U[0, 1): keeps the expected sum
    python tools/round_probe.py --script latent_fm --ckpt runs/latent_fm/ckpt.pt ...   # any script whose
                                                             # --eval draws through its module-level sample()

It changes nothing in the model script: a measurement, to decide whether rounding belongs in the sampler. For
flow_matching.py it did (its CPU default now rounds: --rounding); its rows were measured with this probe.
"""
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import data  # noqa: E402

SCRIPTS = ("flow_matching", "latent_fm", "ddpm")   # their --eval samples through a module-level sample()


def main(argv):
    stochastic = "--stochastic" in argv
    argv = [a for a in argv if a != "--stochastic"]
    script = "flow_matching"
    if "--script" in argv:
        i = argv.index("--script")
        script = argv[i + 1] if i + 1 < len(argv) else None
        del argv[i:i + 2]
        if script not in SCRIPTS:
            sys.exit(f"error: --script takes one of {', '.join(SCRIPTS)} (got {script!r})")
    fm = importlib.import_module(script)
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
