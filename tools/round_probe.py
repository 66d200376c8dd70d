"""Probe (issue 21): evaluate a checkpoint with its generated counts rounded to whole photons.

The toy's responses are integer photon counts; a network's decoder or sampler gives continuous ones: flow
matching's 11-step sampler left a sub-photon haze over every pixel (on ZP 53 % of the generated photon sum). This
runs a script's own --eval with data.to_counts (the last step of every script's sampler: log space -> counts)
rounding its output, and writes eval.json beside the checkpoint as --eval does:

    python tools/round_probe.py --ckpt runs/fm_proton/ckpt.pt --max-test 2000     (any --eval flags)
    python tools/round_probe.py --stochastic --ckpt ...      # floor(x + u), u ~ U[0, 1): keeps the expected sum
    python tools/round_probe.py --poisson --ckpt ...         # a Poisson draw with the output as its mean (the
                                                             # toy's pixels are Poisson given the shower)
    python tools/round_probe.py --script vqgan --ckpt runs/vqgan_disjoint/ckpt.pt ...   # any model script

Reconstructions that go through to_counts (vae.py's, latent_fm.py's reconstruction W) are rounded too; gan.py
multiplies by its brightness scale after to_counts, so its counts are whole photons times that scale.
It changes nothing in the model script: a measurement, to decide whether rounding belongs in the sampler. For
flow_matching.py it did (its CPU default now rounds: --rounding); its rows were measured with this probe.
"""
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import data  # noqa: E402

SCRIPTS = ("flow_matching", "latent_fm", "ddpm", "vae", "sae_ng", "gan", "sdigan_proton", "vqgan", "corrvae",
           "sdigan_joint")


def main(argv):
    stochastic, poisson = "--stochastic" in argv, "--poisson" in argv
    if stochastic and poisson:
        sys.exit("error: --stochastic and --poisson are two different roundings: give one")
    argv = [a for a in argv if a not in ("--stochastic", "--poisson")]
    script = "flow_matching"
    if "--script" in argv:
        i = argv.index("--script")
        script = argv[i + 1] if i + 1 < len(argv) else None
        del argv[i:i + 2]
        if script not in SCRIPTS:
            sys.exit(f"error: --script takes one of {', '.join(SCRIPTS)} (got {script!r})")
    mod = importlib.import_module(script)
    unrounded, g = data.to_counts, torch.Generator().manual_seed(0)   # the uniforms' own seeded generator

    def whole_photons(x):
        x = unrounded(x)
        if poisson:
            return torch.poisson(x.clamp(min=0).cpu(), generator=g).to(x)
        return torch.floor(x + torch.rand(x.shape, generator=g).to(x)) if stochastic else x.round()
    data.to_counts = whole_photons
    try:
        return data.main(mod, ["--eval", *argv])      # the script's own --eval, as from its command line
    finally:
        data.to_counts = unrounded


if __name__ == "__main__":
    main(sys.argv[1:])
