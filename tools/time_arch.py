"""ViT vs CNN on this machine (issue 15): seconds per training step and ms per generated sample of vae.py,
sae_ng.py and gan.py with `--arch cnn` (their CPU default sizes), `--arch vit` (the thesis' ViT) and `--arch vdvae`
(the thesis' CNN; `vdvae:64` at its published width), on ZN toy batches at each script's default batch size. A training step is what the script's train() does per batch (loss,
backward, optimiser step; GAN: one D and one G step); sampling is the script's `sample` at batch 256.
Median over --steps timed steps after one warm-up step; sampling: median of 3.

    OMP_NUM_THREADS=2 python tools/time_arch.py [--steps 5] [--archs cnn,vit,vdvae,vdvae:64] [--json FILE]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import gan  # noqa: E402
import sae_ng  # noqa: E402
import vae  # noqa: E402


def step_fn(name, mod, args):
    """(one training step (x, c) -> None, the network that samples, number of parameters)."""
    nets = mod.build_networks(vars(args))
    n = sum(p.numel() for m in nets.values() for p in m.parameters())
    g = torch.Generator().manual_seed(0)
    if name == "vae":
        model = nets["vae"]
        opt = torch.optim.NAdam(model.parameters(), lr=args.lr, betas=vae.BETAS, eps=vae.EPS, momentum_decay=1e9)

        def step(x, c):
            loss = vae.vae_loss(model, x, c, g, args.kl)[0]
            opt.zero_grad(), loss.backward(), opt.step()
        return step, model, n
    if name == "sae_ng":
        model = sae_ng.build_model(vars(args))
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas), eps=args.adam_eps)

        def step(x, c):
            loss = sae_ng.sae_loss(model, x, c, g, args)[0]
            opt.zero_grad(), loss.backward(), opt.step()
        return step, model, n
    gen, disc = nets["generator"], nets["discriminator"]
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=tuple(args.g_betas))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.d_lr, betas=tuple(args.d_betas))

    def step(x, c):                                  # gan.py's train(): one D step, then one G step
        fake_c = c[torch.randperm(len(c), generator=g)]
        fake = gen(data.noise((len(x), gan.NOISE), g, "cpu"), fake_c)
        d_loss = gan.discriminator_loss(disc, x, c, fake.detach(), fake_c)[0]
        opt_d.zero_grad(), d_loss.backward(), opt_d.step()
        g_loss = gan.generator_loss(disc, fake, fake_c)
        opt_g.zero_grad(), g_loss.backward(), opt_g.step()
    return step, gen, n


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed training steps per row (after one warm-up step)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--archs", default="cnn,vit,vdvae,vdvae:64",
                   help="backbones to time, comma-separated; ARCH:W sets --width W (default: %(default)s)")
    a = p.parse_args()
    split = data.load_split(dict(detector="neutron", data="toy", limit=None, seed=0, split="random"), progress=False)
    x_all, c_all = split.x("train"), split.cond("train")
    rows = []
    for name, mod in (("vae", vae), ("sae_ng", sae_ng), ("gan", gan)):
        for spec in a.archs.split(","):
            arch, _, width = spec.partition(":")
            size = ["--set", f"width={width}"] if mod in (vae, sae_ng, gan) else ["--width", width]
            args = mod.get_args(["--train", "--arch", arch] + (size if width else []))
            torch.manual_seed(0)
            step, sampler, n = step_fn(name, mod, args)
            b = args.batch_size
            times = []
            for i in range(a.steps + 1):
                x, c = x_all[i * b:(i + 1) * b], c_all[i * b:(i + 1) * b]
                t0 = time.perf_counter()
                step(x, c)
                times.append(time.perf_counter() - t0)
            sampler.eval()
            cond = c_all[:256]
            ms = []
            with torch.inference_mode():
                mod.sample(sampler, cond, torch.Generator().manual_seed(0))        # warm-up
                for _ in range(3):
                    t0 = time.perf_counter()
                    mod.sample(sampler, cond, torch.Generator().manual_seed(0))
                    ms.append((time.perf_counter() - t0) / len(cond) * 1e3)
            row = dict(model=name, arch=spec, params=n, batch=b, s_per_step=statistics.median(times[1:]),
                       ms_per_sample=statistics.median(ms), threads=torch.get_num_threads())
            rows.append(row)
            print(f"{name:7s} {spec}: {n:>9,} parameters, batch {b}: {row['s_per_step']:.3f} s per training step, "
                  f"{row['ms_per_sample']:.3f} ms per sample (batch 256), {row['threads']} threads", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(rows=rows, command=" ".join(sys.argv)), indent=1))


if __name__ == "__main__":
    main()
