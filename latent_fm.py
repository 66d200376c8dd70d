"""Latent flow matching for the ALICE Zero Degree Calorimeters: a small VAE, and flow matching in its latent space.

Paper: the flow-matching ZDC paper (arXiv 2507.18811): latent flow matching is the fastest generator of the
study, 0.008-0.026 ms per sample on an A100, at some cost in fidelity compared with pixel-space flow matching.

Stage 1, autoencoder. A convolutional VAE with x4 downsampling maps log1p(counts) (ZN 44x44) to a 4 x 11 x 11
latent (ZP 56x30 is padded to 56x32 -> 4 x 14 x 8). Loss: squared error of the reconstruction (summed over
pixels, averaged over the batch) + `--kl` times the KL divergence to N(0, I). A ReLU makes exact zeros when
decoding to counts, but not in training: on the 99 %-empty ZP images an output ReLU dies and stops every
gradient (seen: stage 1 stuck at the all-zero reconstruction). Logged: train / val loss, and the reconstruction Wasserstein (encode -> decode of
validation responses against themselves: the best the whole model can reach).
Stage 2, flow matching. The training set is encoded once (posterior means), the latents are scaled to unit
standard deviation (the factor is stored), and a small conditional UNet learns the straight-line velocity from
Gaussian noise (t = 0) to latents (t = 1), exactly as in flow_matching.py. Sampling: integrate in latent space
(CPU default: the midpoint rule, 2 steps = 4 UNet calls; a `--paper` checkpoint: the paper's 8 Euler steps;
`--solver`, `--steps`), unscale, decode, expm1. On the same checkpoints midpoint 2 beats Euler 8 at half the UNet
calls (ZN, 2,000 test events: random 3.32x -> 1.94x the floor, classifier AUC 0.750 -> 0.737; condition-disjoint
2.94x -> 2.20x, AUC 0.775 -> 0.766; lookup 9.41x / 0.809; sweeps in results/variants/latent_fm_sweep_neutron_*.json,
docs/models/latent_fm.md). The decoder gives smooth expected counts; the toy's (and a real ZDC's) fibre counts are
Poisson given the shower, so the CPU default draws them (`--rounding poisson`, data.poisson_counts, from explicit
noise: ONNX-exportable): with Euler 8 on the disjoint split, W 2.84x / AUC 0.986 (smooth) -> 2.94x / 0.775. A
`--paper` checkpoint keeps the paper's continuous decoder output (`none`).

Usage:
    python latent_fm.py --train                     # both stages, ZN (25.6 min alone, 2 cores)
    python latent_fm.py --train --stage 1           # only the autoencoder (--stage 2 then reuses it)
    python latent_fm.py --train --detector proton --out runs/lfm_proton
    python latent_fm.py --train --paper             # the paper's sizes (VAE 58k, UNet 129k) and training
    python latent_fm.py --sample --ckpt runs/latent_fm/ckpt.pt --n 1000 --out samples.npz
    python latent_fm.py --export latent_fm.onnx --ckpt runs/latent_fm/ckpt.pt   # the sampler as one ONNX graph
    python latent_fm.py --eval --ckpt runs/latent_fm/ckpt.pt [--solver euler --steps 8] [--plot] [--sweep 1,2,4,8]
    python latent_fm.py --train --smoke             # seconds

`--paper` (docs/fidelity/latent_fm.md lists every setting and its source; explicit flags beat it), from the
authors' code (faster_zdc zdc/models/autoencoder/variational.py, zdc/models/flow_matching/latent_flow_matching.py):
batch 256, 50 epochs per stage, Adam with optax's cosine one-cycle schedule (20 % ramp from peak/25, then down
to peak/25,000), stage 1 peak 2.3e-3 (b1 0.58, b2 0.75), stage 2 peak 1.3e-3 (b1 0.9, b2 0.6), no gradient
clipping, stage-2 t ~ U[0, 0.99], sampling from the trained weights (no EMA). Sizes within 2 % of the
published ones: VAE `--vae-width 21` 58,473 (published 59,348), UNet `--width 20` 129,344 (published 127,824).
Deviations from the paper: the networks match the published sizes, not the published blocks (the authors'
VAE: 4 x 2/3/4 channels, 2 residual blocks per level and an attention block at 11x11; their UNet: flow_matching
.py's published UNet with width 8, mults 1/2/4, 1 block: exactly 127,824). The paper's stage-1 loss is a
gradient-normalised L2 + KL plus a VGG perceptual term and an adversarial term. A pretrained VGG cannot be
downloaded here and ImageNet features say little about sparse photon-count images, so the perceptual term is
left out and nothing pretends to replace it; the adversarial term is also left out (plain L2 + --kl KL), which
makes reconstructions blurrier than the paper's. CPU default: AdamW lr 2e-3 (weight decay 0.01) for both
stages, 100 warm-up steps and cosine decay, gradient norm clipped to 1, batch 128, 1 + 6 epochs, EMA 0.999.
"""
import argparse
import copy
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import metrics

NAME = "latent_fm"
DEFAULTS = dict(epochs=1, epochs2=6, batch_size=128, lr=2e-3, vae_width=20, width=20, heads=2, t_max=1.0,
                betas="0.9,0.999", weight_decay=0.01, schedule="cosine", warmup="100", grad_clip=1.0, ema=0.999)  # ~15 min
PAPER = dict(epochs=50, epochs2=50, batch_size=256, lr=2.3e-3, lr2=1.3e-3, vae_width=21, width=20, heads=2, t_max=0.99,
             betas="0.58,0.75", betas2="0.9,0.6", weight_decay=0.0, schedule="onecycle", warmup="20%", grad_clip=0.0,
             ema=0.0)
PUBLISHED = {"vae": (59_348, "poster: 'a size of 60k'; faster_zdc zdc/models/autoencoder/variational.py VAE: 59,348"),
             "unet": (127_824, "faster_zdc latent_flow_matching.py LatentFMUnet: 127,824 (poster: latent FM 160k "
                               "= UNet + decoder 30,888)")}
ROUNDINGS = ("poisson", "nearest", "none")
SOLVERS = ("euler", "midpoint")
SAMPLER = dict(default=(2, "midpoint"), paper=(8, "euler"))    # (steps, solver) without --steps / --solver
OLD = dict(heads=2, t_max=1.0, betas="0.9,0.999", weight_decay=0.01, schedule="cosine", warmup="100",
           grad_clip=1.0)                          # what checkpoints from before these flags were trained with


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Usage:"):])
    data.add_common_args(p, NAME)
    g = p.add_argument_group("latent flow matching (defaults: CPU default / --paper)")
    g.add_argument("--stage", type=int, default=None, choices=[1, 2], help="train only this stage (default: both)")
    g.add_argument("--epochs2", type=int, default=None, help="epochs of stage 2; --epochs is stage 1 (6 / 50)")
    g.add_argument("--lr2", type=float, default=None, help="learning rate of stage 2; --lr is stage 1 (--lr / 1.3e-3)")
    g.add_argument("--vae-width", type=int, default=None, help="VAE channels (x1, x2 after downsampling) (20: 53k / "
                   "21: 58k)")
    g.add_argument("--width", type=int, default=None, help="latent UNet channels (x1, x2) (20: 129k / 20)")
    g.add_argument("--heads", type=int, default=None, help="attention heads; must divide --width (2 / 2)")
    g.add_argument("--t-max", type=float, default=None, help="stage 2 training t ~ U[0, t_max) (1 / 0.99)")
    g.add_argument("--betas", default=None, help="Adam(W) b1,b2 of stage 1 (0.9,0.999 / 0.58,0.75)")
    g.add_argument("--betas2", default=None, help="Adam(W) b1,b2 of stage 2 (--betas / 0.9,0.6)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay, both stages (0.01 / 0)")
    g.add_argument("--schedule", default=None, choices=["cosine", "onecycle"], help="LR schedule of both stages: "
                   "linear warm-up and cosine decay to 0, or optax's cosine one-cycle (cosine / onecycle)")
    g.add_argument("--warmup", default=None, help="warm-up (one-cycle: ramp) length, N steps or P%% (100 / 20%%)")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this; 0: off (1 / 0)")
    g.add_argument("--ema", type=float, default=None, help="EMA decay of the UNet weights used for sampling; 0: the "
                   "trained weights (0.999 / 0)")
    g.add_argument("--kl", type=float, default=1e-3, help="weight of the KL term of stage 1")
    g.add_argument("--steps", type=int, default=None, help="ODE steps for sampling (2 / 8)")
    g.add_argument("--solver", default=None, choices=SOLVERS, help="ODE solver, midpoint: 2 network calls per step "
                   "(midpoint / euler; a checkpoint trained with --paper samples with the paper's Euler 8)")
    g.add_argument("--rounding", default=None, choices=ROUNDINGS, help="decoder output -> counts: a Poisson draw "
                   "around it, the nearest whole photon, or as it is (poisson; a --paper checkpoint: none)")
    g.add_argument("--val-every", type=int, default=500, help="validate every N steps")
    g.add_argument("--sweep", default=None, metavar="STEPS", help="--eval: quality vs speed for these comma-separated "
                   "step counts, with both solvers (e.g. 1,2,4,8,16); writes sweep.json")
    g.add_argument("--paper", action="store_true", help="the paper's sizes and training (explicit flags still win)")
    args = p.parse_args(argv)
    data.check_args(p, args)
    if args.steps is not None and args.steps <= 0:
        p.error(f"--steps must be positive (got {args.steps})")
    try:
        args.sweep = [int(s) for s in args.sweep.split(",")] if args.sweep else None
        assert not args.sweep or min(args.sweep) > 0
    except (ValueError, AssertionError):
        p.error(f"--sweep takes positive comma-separated step counts, e.g. 1,2,4,8 (got {args.sweep!r})")
    for k, v in {**DEFAULTS, **(PAPER if args.paper else {})}.items():
        if getattr(args, k) is None:                   # precedence: explicit flag > --paper > CPU default
            setattr(args, k, v)
    args.lr2, args.betas2 = args.lr2 or args.lr, args.betas2 or args.betas
    if args.smoke:
        args.limit, args.vae_width, args.width, args.batch_size = args.limit or 1500, 4, 4, 32
        args.max_steps = args.max_steps or 4
        args.max_test, args.reps, args.ckpt_every = min(args.max_test or 200, 200), min(args.reps, 2), 2
    for b in (args.betas, args.betas2):
        try:
            assert all(0 <= float(x) < 1 for x in b.split(",")) and len(b.split(",")) == 2
        except (ValueError, AssertionError):
            p.error(f"--betas/--betas2 take b1,b2 in [0, 1), e.g. 0.9,0.999 (got {b!r})")
    for bad, msg in [(args.width <= 0 or args.vae_width <= 0 or args.heads <= 0 or args.width % args.heads,
                      "--width must be positive and a multiple of --heads, --vae-width positive"),
                     (not re.fullmatch(r"\d+%?", args.warmup), f"--warmup takes N steps or P% (got {args.warmup!r})"),
                     (not 0 < args.t_max <= 1, f"--t-max must be in (0, 1] (got {args.t_max})"),
                     (not 0 <= args.ema < 1 or not args.grad_clip >= 0 or not args.weight_decay >= 0,
                      "--ema must be in [0, 1), --grad-clip and --weight-decay >= 0"),
                     (args.lr2 <= 0, f"--lr2 must be positive (got {args.lr2})")]:
        if bad:
            p.error(msg)
    args.out = args.out or f"runs/{NAME}"
    if args.train:                                     # validation samples with the run's sampler
        args.steps, args.solver, args.rounding = sampler_for(args, args.paper)
    return args


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------
def groups(ch):
    return math.gcd(ch, 4)


class VAE(nn.Module):
    """x4 downsampling conv VAE: (1, H, W) log1p image <-> (4, H/4, W/4) latent."""

    def __init__(self, width=16, zc=4):
        super().__init__()
        w1, w2 = width, 2 * width

        def block(ci, co, **kw):
            return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1, **kw), nn.GroupNorm(groups(co), co), nn.SiLU())
        self.enc = nn.Sequential(block(1, w1), block(w1, w1, stride=2), block(w1, w2), block(w2, w2, stride=2),
                                 nn.Conv2d(w2, 2 * zc, 1))
        self.dec = nn.Sequential(nn.Conv2d(zc, w2, 3, padding=1), nn.SiLU(), block(w2, w2),
                                 nn.Upsample(scale_factor=2), block(w2, w1), nn.Upsample(scale_factor=2),
                                 block(w1, w1), nn.Conv2d(w1, 1, 3, padding=1))

    def encode(self, x):
        H, W = x.shape[-2:]
        mu, logvar = self.enc(F.pad(x, (0, -W % 4, 0, -H % 4))).chunk(2, 1)
        return mu, logvar.clamp(-20, 10)

    def decode(self, z, shape):
        return self.dec(z)[..., :shape[0], :shape[1]]


def timestep_embedding(t, dim):
    """Sinusoidal embedding of t in [0, 1], rescaled to t * 1000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    a = 1000.0 * t[:, None].float() * freqs[None]
    return torch.cat([a.sin(), a.cos()], 1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.e = nn.Linear(emb, cout)
        self.n2, self.c2 = nn.GroupNorm(groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.c1(F.silu(self.n1(x))) + self.e(e)[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class Attention(nn.Module):
    """Self-attention over the latent pixels plus one condition token."""

    def __init__(self, ch, emb, heads):
        super().__init__()
        self.norm, self.tok = nn.GroupNorm(groups(ch), ch), nn.Linear(emb, ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)

    def forward(self, x, c):
        B, C, H, W = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2)
        kv = torch.cat([self.tok(c)[:, None], q], 1)
        return x + self.attn(q, kv, kv, need_weights=False)[0].transpose(1, 2).reshape(B, C, H, W)


class LatentUNet(nn.Module):
    """Two-level UNet on the latent grid with attention (and the condition token) at both levels."""

    def __init__(self, zc=4, width=16, heads=2, n_cond=9, emb=64):
        super().__init__()
        c1, c2 = width, 2 * width
        self.emb = emb
        self.t_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.c_mlp = nn.Sequential(nn.Linear(n_cond, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(zc, c1, 3, padding=1)
        self.d1, self.a1 = ResBlock(c1, c1, emb), Attention(c1, emb, heads)
        self.down = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.m1, self.am, self.m2 = ResBlock(c2, c2, emb), Attention(c2, emb, heads), ResBlock(c2, c2, emb)
        self.upc = nn.Conv2d(c2, c1, 3, padding=1)
        self.u1, self.a2 = ResBlock(2 * c1, c1, emb), Attention(c1, emb, heads)
        self.out = nn.Sequential(nn.GroupNorm(groups(c1), c1), nn.SiLU(), nn.Conv2d(c1, zc, 3, padding=1))

    def forward(self, z, t, cond):
        H, W = z.shape[-2:]
        z = F.pad(z, (0, W % 2, 0, H % 2))
        e = self.t_mlp(timestep_embedding(t, self.emb)) + self.c_mlp(cond)
        h1 = self.a1(self.d1(self.inp(z), e), e)
        h = self.m2(self.am(self.m1(self.down(h1), e), e), e)
        h = self.upc(F.interpolate(h, size=h1.shape[-2:], mode="nearest"))
        h = self.a2(self.u1(torch.cat([h, h1], 1), e), e)
        return self.out(h)[..., :H, :W]


def build_networks(cfg):
    """{'vae': stage 1, 'unet': stage 2} described by a checkpoint's args (missing keys: older checkpoints')."""
    cfg = {**OLD, **cfg}
    return {"vae": VAE(cfg["vae_width"]), "unet": LatentUNet(width=cfg["width"], heads=cfg["heads"])}


def build_model(cfg):
    """(VAE, latent UNet), the order sample() takes them."""
    return tuple(build_networks(cfg).values())


# ----------------------------------------------------------------------------------------------------------
# Method: losses and sampler
# ----------------------------------------------------------------------------------------------------------
def vae_loss(vae, x, generator, kl_weight):
    mu, logvar = vae.encode(x)
    z = mu + torch.randn(mu.shape, generator=generator, device=x.device) * (0.5 * logvar).exp()
    rec = (vae.decode(z, x.shape[-2:]) - x).pow(2).flatten(1).sum(1).mean()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
    return rec + kl_weight * kl


def fm_loss(unet, z1, cond, generator, t_max=1.0):
    """Conditional flow matching on (scaled) latents: noise at t = 0, data at t = 1, velocity z1 - z0, t ~ U[0, t_max)."""
    z0 = torch.randn(z1.shape, generator=generator, device=z1.device)
    t = t_max * torch.rand(len(z1), generator=generator, device=z1.device)
    tb = t[:, None, None, None]
    return F.mse_loss(unet(((1 - tb) * z0 + tb * z1), t, cond), z1 - z0)


def latent_shape(shape):
    return (4, math.ceil(shape[0] / 4), math.ceil(shape[1] / 4))


class Sampler(data.Sampler):
    """The ODE solver in latent space (Euler, or midpoint: 2 network calls per step) and the decoder as one module
    (bench.py, --export), unrolled for `steps`: counts from cond (n, 9), the starting latent noise z0
    (n, 4, H/4, W/4) and, for Poisson counts, the draw's noise u_counts and z_counts (n, H, W)."""

    uniform = ("u_counts",)

    def __init__(self, vae, unet, shape, scale, steps=2, rounding="poisson", solver="midpoint"):
        if rounding not in ROUNDINGS or solver not in SOLVERS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, solver one of {SOLVERS} (got {rounding!r}, "
                             f"{solver!r})")
        super().__init__(steps=steps, solver=solver, nfe=steps * (2 if solver == "midpoint" else 1),
                         latent_scale=float(scale), rounding=rounding)
        self.vae, self.unet, self.shape, self.scale, self.steps = vae, unet, tuple(shape), float(scale), steps
        self.rounding, self.solver = rounding, solver

    def noise_shapes(self, n):
        counts = {"u_counts": (n,) + self.shape, "z_counts": (n,) + self.shape} if self.rounding == "poisson" else {}
        return {"z0": (n,) + latent_shape(self.shape), **counts}

    def integrate(self, cond, z):
        """The latent ODE dz/dt = unet(z, t, cond) from t = 0 to 1: noise z0 -> data latent."""
        dt = 1.0 / self.steps
        for i in range(self.steps):
            t = torch.full_like(cond[:, 0], i * dt)
            v = self.unet(z, t, cond)
            if self.solver == "midpoint":
                v = self.unet(z + 0.5 * dt * v, t + 0.5 * dt, cond)
            z = z + dt * v
        return z

    def forward(self, cond, z, *count_noise):
        z = self.integrate(cond, z)
        mean = data.to_counts(F.relu(self.vae.decode(z * self.scale, self.shape)))
        if self.rounding == "poisson":
            return data.poisson_counts(mean, *count_noise)
        return mean.round() if self.rounding == "nearest" else mean


@torch.no_grad()
def sample(vae, unet, cond, shape, scale, generator=None, steps=2, rounding="poisson", solver="midpoint"):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9); noise from a CPU generator."""
    return Sampler(vae, unet, shape, scale, steps, rounding, solver).run(cond, generator)


def rounding_for(args, paper):
    """The explicit --rounding, else the paper's continuous output for a --paper run, else Poisson counts."""
    return args.rounding or ("none" if paper else "poisson")


def sampler_for(args, paper):
    """(steps, solver, rounding): the explicit flags, else the paper's sampler (Euler 8, continuous counts) for a
    --paper model, else the CPU default (midpoint 2: 4 network calls, Poisson counts; measured in the docstring)."""
    steps, solver = SAMPLER["paper" if paper else "default"]
    return getattr(args, "steps", None) or steps, getattr(args, "solver", None) or solver, rounding_for(args, paper)


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------
def ema_update(ema, model, decay, step):
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - d)


@torch.no_grad()
def encode_all(vae, x, dev, batch=2048):
    return torch.cat([vae.encode(b.to(dev))[0].cpu() for b in torch.split(x, batch)])


def schedule(n, epochs, args):
    """(steps per epoch, steps the LR schedule spans, steps this run trains to) for n training examples."""
    spe = math.ceil(n / args.batch_size)
    return spe, epochs * spe, min(epochs * spe, args.max_steps or epochs * spe)


def lr_factor(schedule, warmup, planned):
    """step -> LR multiplier. cosine: linear warm-up over `warmup` ("N" steps or "P%" of `planned`), then cosine
    decay to 0. onecycle (optax.cosine_onecycle_schedule, div factors 25 and 1000, the authors' code): cosine
    ramp from 1/25 to 1 over `warmup`, then cosine down to 1/25,000."""
    w = planned * int(warmup[:-1]) / 100 if warmup.endswith("%") else int(warmup)

    def cos(a, b, f):                                                 # a at f = 0 to b at f = 1
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * min(f, 1.0)))

    def f(s):
        if schedule == "onecycle":
            return cos(1 / 25, 1.0, s / w) if s < w else cos(1.0, 1 / 25_000, (s - w) / max(planned - w, 1))
        return (min(1.0, (s + 1) / w) if w > 0 else 1.0) * cos(1.0, 0.0, s / planned)
    return f


def fit(stage, module, loss_fn, tensors, epochs, args, state, save, validate, ema=None):
    """The training loop of one stage (both stages share it): resumable at any step."""
    dev = next(module.parameters()).device
    lr, betas = (args.lr, args.betas) if stage == 1 else (args.lr2, args.betas2)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=tuple(float(b) for b in betas.split(",")),
                            weight_decay=args.weight_decay)
    spe, planned, total = schedule(len(tensors[0]), epochs, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.schedule, args.warmup, planned))
    noise = torch.Generator(dev).manual_seed(args.seed + stage)
    st = state.setdefault(f"stage{stage}", dict(step=0))
    if "opt" in st:                                                # resume
        opt.load_state_dict(st["opt"]), sched.load_state_dict(st["sched"]), noise.set_state(st["noise"])
    print(f"stage {stage}: {sum(p.numel() for p in module.parameters()):,} parameters, {spe} steps per epoch, "
          f"{total} steps in total")

    def checkpoint():
        st.update(opt=opt.state_dict(), sched=sched.state_dict(), noise=noise.get_state())
        save()

    t0, losses = time.time(), []
    while st["step"] < total:
        epoch = st["step"] // spe
        order = torch.Generator().manual_seed(args.seed * 100_003 + 1000 * stage + epoch)
        skip = st["step"] - epoch * spe                                     # batches already done (resume)
        bar = tqdm(data.batches(tensors, args.batch_size, order, start=skip), total=spe, initial=skip,
                   desc=f"stage {stage} epoch {epoch + 1}/{epochs}", leave=False, disable=args.smoke)
        for batch in bar:
            with data.autocast(dev, args.amp):
                loss = loss_fn(*[b.to(dev) for b in batch], noise)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"stage {stage}: loss is {loss.item()} at step {st['step']} (lower --lr?)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(module.parameters(), args.grad_clip)
            opt.step(), sched.step()
            if ema is not None:
                ema_update(ema, module, args.ema, st["step"])
            st["step"] += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if st["step"] % args.ckpt_every == 0:
                checkpoint()
            if st["step"] % args.val_every == 0 or st["step"] >= total:
                bar.clear()
                validate(st["step"], float(np.mean(losses)), (time.time() - t0) / 60)
                losses = []
            if st["step"] >= total:
                break
        bar.close()
    checkpoint()


def train(args):
    dev = data.pick_device(args.device)
    data.seed_everything(args.seed)
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    ck = None
    if ckpt_path.exists() and not (args.resume or args.stage == 2):
        raise data.DataError(f"{ckpt_path} exists: pass --resume to continue it, or --out a new folder")
    if ckpt_path.exists():
        ck = data.load_checkpoint(ckpt_path, NAME)
        stage, args = args.stage, data.resume_args(args, ck, older=dict(OLD, lr2=ck["args"]["lr"],
                                                                          betas2=ck["args"].get("betas", OLD["betas"])))
        args.stage = stage
    split = data.load_split(vars(args))
    shape = tuple(data.SHAPES[args.detector])
    x_tr, c_tr = split.x("train"), split.cond("train")
    x_va, c_va = split.x("val")[:2000], split.cond("val")[:2000]
    vae, unet = (m.to(dev) for m in build_model(vars(args)))
    ema = copy.deepcopy(unet).requires_grad_(False)
    state = dict(scale=1.0)
    if ck is not None:
        vae.load_state_dict(ck["vae"]), unet.load_state_dict(ck["unet"]), ema.load_state_dict(ck["ema"])
        state = ck["state"]
        print(f"continuing {ckpt_path}: stage 1 at step {state.get('stage1', {}).get('step', 0)}, "
              f"stage 2 at step {state.get('stage2', {}).get('step', 0)}")

    def save():
        data.save_checkpoint(dict(model=NAME, args=vars(args), data=split.state(), vae=vae.state_dict(),
                                  unet=unet.state_dict(), ema=ema.state_dict(), state=state,
                                  n_params=sum(p.numel() for m in (vae, unet) for p in m.parameters())), ckpt_path)

    def log(stage, step, loss, minutes, **extra):
        row = dict(stage=stage, step=step, train_loss=loss, minutes=minutes, **extra)
        data.log_jsonl(out / "metrics.jsonl", **row)
        print(f"stage {stage} step {step:6d}  train loss {loss:.4f}  " +
              "  ".join(f"{k} {v:.4f}" for k, v in extra.items()) + f"  {minutes:.1f} min")

    def validate1(step, loss, minutes):
        with torch.no_grad():
            g = torch.Generator(dev).manual_seed(1234)
            val = np.mean([vae_loss(vae, x.to(dev), g, args.kl).item() for (x,) in data.batches((x_va,), 500, shuffle=False)])
            rec = data.to_counts(F.relu(vae.decode(vae.encode(x_va[:1000].to(dev))[0], shape)))
        log(1, step, loss, minutes, val_loss=float(val), rec_W=metrics.wasserstein(split.counts("val")[:1000], rec)[0])

    def validate2(step, loss, minutes):
        with torch.no_grad():
            g = torch.Generator(dev).manual_seed(1234)
            val = np.mean([fm_loss(ema, z.to(dev), c.to(dev), g, args.t_max).item()
                           for z, c in data.batches((z_va, c_va), 500, shuffle=False)])
            gen = sample(vae, ema, c_va[:1000].to(dev), shape, state["scale"], torch.Generator().manual_seed(0), args.steps,
                         args.rounding, args.solver)
        log(2, step, loss, minutes, val_loss=float(val), val_W=metrics.wasserstein(split.counts("val")[:1000], gen)[0])

    steps = {k: state.get(f"stage{k}", {}).get("step", 0) for k in (1, 2)}
    target1, target2 = schedule(len(x_tr), args.epochs, args)[2], schedule(len(x_tr), args.epochs2, args)[2]
    if args.stage in (None, 1) and steps[1] < target1:
        fit(1, vae, lambda x, g: vae_loss(vae, x, g, args.kl), (x_tr,), args.epochs, args, state, save, validate1)
    if args.stage in (None, 2) and steps[2] < target2:
        if state.get("stage1", {}).get("step", 0) < target1:
            raise data.DataError(f"{ckpt_path}: stage 1 is not finished; train it first (--stage 1)")
        vae.eval().requires_grad_(False)
        z_tr = encode_all(vae, x_tr, dev)
        if "stage2" not in state:                                 # a fresh stage 2 fixes the scale
            state["scale"] = float(z_tr.std())
        z_tr, z_va = z_tr / state["scale"], encode_all(vae, x_va, dev) / state["scale"]
        print(f"latents {tuple(z_tr.shape[1:])}, scale {state['scale']:.4f}")
        fit(2, unet, lambda z, c, g: fm_loss(unet, z, c, g, args.t_max), (z_tr, c_tr), args.epochs2, args, state, save,
            validate2, ema)
    print(f"checkpoint {ckpt_path}")
    return ckpt_path


def load_model(args):
    ck = data.load_checkpoint(args.ckpt or Path(args.out) / "ckpt.pt", NAME, args.detector)
    if not ck["state"].get("stage2", {}).get("step"):
        raise data.DataError(f"{args.ckpt}: stage 2 is not trained yet (python {NAME}.py --train --resume)")
    dev = data.pick_device(args.device)
    vae, unet = build_model(ck["args"])
    vae.load_state_dict(ck["vae"]), unet.load_state_dict(ck["ema"])
    args.steps, args.solver, args.rounding = sampler_for(args, ck["args"].get("paper", False))
    return ck, vae.to(dev).eval(), unet.to(dev).eval(), dev


def generator_fn(vae, unet, ck, device, steps, amp=False, rounding="poisson", solver="midpoint"):
    def generate(cond, g):
        with data.autocast(device, amp):
            return sample(vae, unet, cond.to(device), tuple(ck["data"]["shape"]), ck["state"]["scale"], g, steps,
                          rounding, solver).float()
    return generate


def sample_cmd(args):
    ck, vae, unet, dev = load_model(args)
    data.sample_to_file(ck, generator_fn(vae, unet, ck, dev, args.steps, args.amp, args.rounding, args.solver), args)


def export_cmd(args):
    ck, vae, unet, dev = load_model(args)
    data.export_onnx(Sampler(vae, unet, ck["data"]["shape"], ck["state"]["scale"], args.steps, args.rounding,
                             args.solver), ck,
                     args.export, NAME)


def evaluate(args):
    ck, vae, unet, dev = load_model(args)
    split = data.split_from_checkpoint(ck)
    if args.sweep:
        return metrics.run_sweep(lambda solver, steps: generator_fn(vae, unet, ck, dev, steps, args.amp, args.rounding,
                                                                    solver),
                                 [dict(solver=s, steps=n) for s in SOLVERS for n in args.sweep], split,
                                 Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("sweep.json"), args, NAME)
    idx = split.idx["test"][:args.max_test or None]
    with torch.no_grad():   # stage-1 quality: encode -> decode the test responses
        rec = np.concatenate([data.to_counts(F.relu(vae.decode(vae.encode(x.to(dev))[0], tuple(ck["data"]["shape"])))).cpu().numpy()
                              for x in torch.split(data.to_log(split.ds.images[idx]), 1024)])
    rec_w = metrics.wasserstein(split.ds.images[idx], rec)[0]
    print(f"stage 1 reconstruction Wasserstein (encode -> decode of the test responses): {rec_w:.3f}")
    setting = (args.steps, args.solver, args.rounding)
    default = sampler_for(argparse.Namespace(rounding=None), ck["args"].get("paper", False))
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name(
        "eval.json" if setting == default else f"eval_{args.solver}{args.steps}_{args.rounding}.json")
    counts = {"poisson": ", Poisson counts", "nearest": ", whole photons", "none": ""}[args.rounding]
    return metrics.run_eval(generator_fn(vae, unet, ck, dev, args.steps, args.amp, args.rounding, args.solver),
                            split, path, args, f"{NAME} ({args.solver} {args.steps}{counts})",
                            dict(steps=args.steps, solver=args.solver, rounding=args.rounding, reconstruction_W=rec_w,
                                 n_params=ck["n_params"]))


if __name__ == "__main__":
    args = get_args()
    try:
        if args.train:
            args.ckpt = str(train(args))
        if args.sample:
            sample_cmd(args)
        if args.eval:
            evaluate(args)
        if args.export:
            export_cmd(args)
    except (data.DataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
