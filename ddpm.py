"""Conditional DDPM with DDIM sampling for the ALICE Zero Degree Calorimeters.

Thesis: "Generative fast simulation of the ALICE ZDC" (arXiv 2407.16704): its best diffusion model on the real
neutron set reaches Wasserstein 3.15 with 50 DDIM steps and eta 0.7 (5.36 ms per sample on an A100) and 2.10
with 1000 steps; its DDIM step sweep (eta 1): 5 steps 9.68, 10: 6.69, 25: 5.10, 50: 3.66, 100: 2.75.

Method. x0 = log1p(counts) (not rescaled) is noised over T = 1000 integer steps t = 0..999 with a linear beta
schedule 1e-4 .. 2e-2: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, abar_t = prod_{s <= t} (1 - beta_s) (a
buffer of the model, so checkpoints carry it; the EMA averages parameters only). The network predicts eps
(loss = MSE, t uniform). Sampling is DDIM (Song et al. 2021) on `--steps` timesteps spread evenly from 999 down
to 0, both included (rounded linspace(999, 0, steps)), with abar_{-1} = 1 after the last and noise scale
sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)): eta = 0 is deterministic DDIM;
1000 steps with eta = 1 is exactly the ancestral DDPM sampler (`ddpm_ancestral`, compared by a test: the
same noise draws in the same order). Each step clips the predicted x0 to the data range [0, largest log1p
count of the training set] and recomputes eps from it (Ho et al.'s clip_denoised); the last step returns
that x0, and expm1 gives the counts.

Network: flow_matching.py's compact UNet. Channels `--width` x `--mults` (CPU default 4 x 2/3/4 = 8/12/16 over ZN
44x44 -> 22x22 -> 11x11, 89k parameters; --paper 16 x 1/2/4/8 = 16/32/64/128 over 48 -> 24 -> 12 -> 6, 4,046,913
parameters, the thesis' "four million"), `--n-res` residual blocks per level, self-attention (`--heads`) with the
condition as an extra token at the lowest `--attn-levels` levels and in the middle. Time embedding: sinusoidal on
the integer step t itself (0..999, not rescaled: the range of flow_matching.py's t * 1000). The 9 standardised
features go through an MLP added to the time embedding (and projected to the attention token). Images are
zero-padded to a multiple of 2^(levels - 1) and cropped back. EMA decay min(0.999, (1 + step) / (10 + step)). The
eps output has a fixed skip from the input (EDM-style preconditioning written for eps): with s the pixel std of
the training set (a buffer) and v = abar s^2 + 1 - abar, eps = sqrt(1 - abar) / v * x_t + sqrt(abar / v) * s *
UNet(x_t, t, c), the best linear guess plus a unit-scale correction. Near t = 999 it makes eps ~ x_t exactly, so
the x0 implied there stays of the order of s instead of the network's error times 1 / sqrt(abar) ~ 160 (a plain
eps network trained for 20 CPU minutes never learns that identity well enough, and its samples saturate).

Usage:
    python ddpm.py --train                      # ZN, CPU default (~15-20 min on 2 cores), runs/ddpm
    python ddpm.py --train --detector proton --out runs/ddpm_zp
    python ddpm.py --train --split disjoint     # test particles never seen in training
    python ddpm.py --train --paper              # the thesis: 16/32/64/128 channels (4.0M), AdamW 2.8e-5, 100 epochs
    python ddpm.py --sample --ckpt runs/ddpm/ckpt.pt --n 1000 --out samples.npz [--steps 50 --eta 0.7]
    python ddpm.py --export ddpm.onnx --ckpt runs/ddpm/ckpt.pt [--steps 50 --eta 0.7]   # the sampler as one ONNX graph
    python ddpm.py --eval --ckpt runs/ddpm/ckpt.pt [--steps 100 --eta 1] [--plot]
    python ddpm.py --eval --ckpt runs/ddpm/ckpt.pt --sweep --max-test 500 --reps 2 --plot   # steps x eta grid
    python ddpm.py --train --smoke              # seconds: tiny data, tiny model
Logged every --val-every steps: train loss (noise MSE), val loss (same, fixed t and noise), the validation
Wasserstein of 500 generated samples (--steps, --eta; lower is better; compare with the floor of --eval;
W depends on the sample count).

`--paper` (docs/fidelity/ddpm.md lists every setting and its source; explicit flags beat it): 16/32/64/128
channels, 2 blocks, attention at the two lowest levels with 4 heads; AdamW lr 2.8e-5, b1 0.87, b2 0.82, eps
2.5e-5, weight decay 5.5e-4, linear warm-up over 10 % of the steps then cosine decay (thesis Table A.5,
Section 4.11), gradient norm clipped to 1, batch 256, 100 epochs (Table 4.2). Deviations from the thesis: its
network is diffusers' UNet2DConditionModel (cross-attention to the features at the 11x11 level and in the
middle, m-wojnar/zdc zdc/models/diffusion/diffusion.py); this compact UNet matches its channels and size, not
its blocks. The CPU default is a much smaller UNet (89k parameters, attention at the lowest level only, 1 head)
trained for one epoch with AdamW lr 2e-3 (betas 0.9/0.999, no weight decay), 100 warm-up steps, cosine decay,
batch 128: the thesis' lr 2.8e-5 is far too small for one CPU epoch. Data are log1p counts, not rescaled to
[-1, 1] (so x0 is clipped to [0, x_max]; the thesis' code clips x0 to [-7, 7]); the eps network has the fixed
input skip above; DDIM steps include t = 0 (the thesis' code: "trailing" spacing, 999 ... 19).

Measured (2026-12-04, CPU default, 1 epoch, `--eval --max-test 2000`): ZN random W 18.39 +- 0.55, 8.9x the floor
(results/ddpm_neutron_random.json); condition-disjoint W 14.14 +- 0.24, 8.3x the floor
(results/ddpm_neutron_disjoint.json). Details and history: docs/models/ddpm.md.
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

NAME = "ddpm"
T = 1000                                                # diffusion steps of training
X_MAX = math.log1p(2 ** 16 - 1)                         # log1p of the largest uint16 count: samples are clipped to it
DEFAULTS = dict(epochs=1, batch_size=128, lr=2e-3, width=4, mults="2,3,4", n_res=2, attn_levels=1, heads=1,
                betas="0.9,0.999", adam_eps=1e-8, weight_decay=0.0, schedule="cosine", warmup="100", grad_clip=1.0,
                ema=0.999)                              # CPU default: ~15-20 minutes on 2 cores for ZN
PAPER = dict(epochs=100, batch_size=256, lr=2.8e-5, width=16, mults="1,2,4,8", n_res=2, attn_levels=2, heads=4,
             betas="0.87,0.82", adam_eps=2.5e-5, weight_decay=5.5e-4, schedule="cosine", warmup="10%", grad_clip=1.0,
             ema=0.999)                                 # thesis Table 4.2, Table A.5, Section 4.11; docs/fidelity/ddpm.md
PUBLISHED = {"unet": (4_000_000, "thesis Section 4.11: 'a DDPM model with four million parameters'")}
OLD = dict(n_res=2, heads=1, betas="0.9,0.999", adam_eps=1e-8, weight_decay=0.0, schedule="cosine", warmup="100",
           grad_clip=1.0)                               # what checkpoints from before these flags were trained with
SWEEP_ETAS = (0.0, 0.7, 1.0)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Usage:"):])
    data.add_common_args(p, NAME)
    g = p.add_argument_group("DDPM (defaults: CPU default / --paper)")
    g.add_argument("--width", type=int, default=None, help="base width; channels are width x --mults (4 / 16)")
    g.add_argument("--mults", default=None, help="channel multipliers, one resolution level each (2,3,4 / 1,2,4,8)")
    g.add_argument("--n-res", type=int, default=None, help="residual blocks per level (2 / 2)")
    g.add_argument("--attn-levels", type=int, default=None,
                   help="lowest resolution levels with attention, plus the middle (1 / 2; 0: the middle only)")
    g.add_argument("--heads", type=int, default=None, help="attention heads (1 / 4)")
    g.add_argument("--betas", default=None, help="AdamW b1,b2 (0.9,0.999 / 0.87,0.82)")
    g.add_argument("--adam-eps", type=float, default=None, help="AdamW epsilon (1e-8 / 2.5e-5)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (0 / 5.5e-4)")
    g.add_argument("--schedule", default=None, choices=["cosine", "constant"], help="LR after warm-up (cosine / cosine)")
    g.add_argument("--warmup", default=None, help="linear LR warm-up: N steps or P%% of the steps (100 / 10%%)")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this; 0: off (1 / 1)")
    g.add_argument("--ema", type=float, default=None, help="EMA decay of the weights used for sampling (0.999 / 0.999)")
    g.add_argument("--steps", type=int, default=50, help=f"DDIM sampling steps, 1..{T} ({T} with --eta 1: ancestral DDPM)")
    g.add_argument("--eta", type=float, default=0.7, help="DDIM noise scale in [0, 1]: 0 deterministic, 1 DDPM variance")
    g.add_argument("--val-every", type=int, default=1000, help="validate (loss and Wasserstein) every N steps")
    g.add_argument("--sweep", nargs="?", const="5,10,25,50,100", default=None, metavar="STEPS",
                   help="--eval: quality vs speed for these comma-separated step counts (default 5,10,25,50,100), "
                   "each with eta 0, 0.7 and 1; writes sweep.json (and sweep.png with --plot)")
    g.add_argument("--paper", action="store_true", help="the thesis' network size and training (explicit flags still win)")
    args = p.parse_args(argv)
    data.check_args(p, args)
    for bad, msg in [(not 1 <= args.steps <= T, f"--steps must be between 1 and {T} (got {args.steps})"),
                     (not 0.0 <= args.eta <= 1.0, f"--eta must be in [0, 1] (got {args.eta})")]:
        if bad:
            p.error(msg)
    try:
        args.sweep = [int(s) for s in args.sweep.split(",")] if args.sweep else None
        assert not args.sweep or (min(args.sweep) >= 1 and max(args.sweep) <= T)
    except (ValueError, AssertionError):
        p.error(f"--sweep takes comma-separated step counts between 1 and {T}, e.g. 5,10,25 (got {args.sweep!r})")
    for k, v in {**DEFAULTS, **(PAPER if args.paper else {})}.items():
        if getattr(args, k) is None:                   # precedence: explicit flag > --paper > CPU default
            setattr(args, k, v)
    if args.smoke:
        args.limit, args.width, args.max_steps, args.batch_size = args.limit or 1500, 2, args.max_steps or 6, 32
        args.max_test, args.reps, args.ckpt_every = min(args.max_test or 200, 200), min(args.reps, 2), 3
        args.steps, args.heads = min(args.steps, 2), 1
    check_unet_args(p, args)
    args.out = args.out or f"runs/{NAME}"
    return args


def check_unet_args(p, args):
    """Argparse errors (exit 2, no traceback) for the network and optimiser flags."""
    try:
        mults = [int(m) for m in str(args.mults).split(",")]
        assert 1 <= len(mults) <= 5 and min(mults) > 0
    except (ValueError, AssertionError):
        p.error(f"--mults takes 1 to 5 positive comma-separated integers, e.g. 2,3,4 (got {args.mults!r})")
    try:
        b1, b2 = (float(b) for b in str(args.betas).split(","))
        assert 0 <= b1 < 1 and 0 <= b2 < 1
    except (ValueError, AssertionError):
        p.error(f"--betas takes b1,b2 in [0, 1), e.g. 0.9,0.999 (got {args.betas!r})")
    if not re.fullmatch(r"\d+%?", str(args.warmup)):
        p.error(f"--warmup takes a step count or a percentage, e.g. 100 or 10% (got {args.warmup!r})")
    for bad, msg in [(args.width <= 0 or args.n_res <= 0, "--width and --n-res must be positive"),
                     (not 0 <= args.attn_levels <= len(mults), f"--attn-levels must be in 0..{len(mults)} (the levels)"),
                     (args.heads <= 0 or any(args.width * m % args.heads for m in mults),
                      f"--heads must divide every level's channels ({args.width} x {args.mults})"),
                     (not (args.adam_eps > 0 and args.weight_decay >= 0), "--adam-eps must be > 0, --weight-decay >= 0"),
                     (not 0 <= args.ema < 1, f"--ema must be in [0, 1) (got {args.ema})"),
                     (not args.grad_clip >= 0, f"--grad-clip must be >= 0 (got {args.grad_clip})")]:
        if bad:
            p.error(msg)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def timestep_embedding(t, dim):
    """Sinusoidal embedding of the integer diffusion step t in 0..T-1 (used as is, no rescaling)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    a = t[:, None].float() * freqs[None]
    return torch.cat([a.sin(), a.cos()], 1)


def groups(ch):
    return math.gcd(ch, 4)


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
    """Self-attention over the pixels plus one condition token."""

    def __init__(self, ch, emb, heads=1):
        super().__init__()
        self.norm, self.tok = nn.GroupNorm(groups(ch), ch), nn.Linear(emb, ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)

    def forward(self, x, c):
        B, C, H, W = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2)                       # (B, HW, C)
        kv = torch.cat([self.tok(c)[:, None], q], 1)                      # condition token first
        return x + self.attn(q, kv, kv, need_weights=False)[0].transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """eps(x_t, t, cond). The diffusion schedule and the data range are buffers (not parameters: the EMA
    never touches them)."""

    def __init__(self, width=4, mults=(2, 3, 4), n_res=2, n_cond=9, attn_levels=1, heads=1, beta=(1e-4, 2e-2)):
        super().__init__()
        ch = [width * m for m in mults]
        attn = [i >= len(ch) - attn_levels for i in range(len(ch))]  # attention at the lowest levels
        self.emb = emb = max(32, 8 * width)
        self.pad = 2 ** (len(ch) - 1)                                # images padded to a multiple of this
        betas = torch.linspace(beta[0], beta[1], T, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())   # the whole schedule
        self.register_buffer("x_max", torch.tensor(X_MAX))         # largest log1p count of the training set and
        self.register_buffer("x_std", torch.tensor(0.5))           # its pixel std (train() sets both from the data)
        self.t_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.c_mlp = nn.Sequential(nn.Linear(n_cond, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(1, ch[0], 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips, c = [ch[0]], ch[0]
        for i, co in enumerate(ch):
            for _ in range(n_res):
                self.down.append(nn.ModuleList([ResBlock(c, co, emb), Attention(co, emb, heads) if attn[i] else None]))
                c = co
                skips.append(c)
            if i < len(ch) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb), Attention(c, emb, heads), ResBlock(c, c, emb)])
        for i, co in reversed(list(enumerate(ch))):
            for _ in range(n_res + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), co, emb),
                                              Attention(co, emb, heads) if attn[i] else None]))
                c = co
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out = nn.Sequential(nn.GroupNorm(groups(c), c), nn.SiLU(), nn.Conv2d(c, 1, 3, padding=1))

    def forward(self, x, t, cond):
        H, W = x.shape[-2:]
        x = F.pad(x, (0, -W % self.pad, 0, -H % self.pad))              # to a multiple of 2^levels, cropped below
        e = self.t_mlp(timestep_embedding(t, self.emb)) + self.c_mlp(cond)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.Conv2d):
                h = layer(h)
            else:
                h = layer[0](h, e)
                h = layer[1](h, e) if layer[1] is not None else h
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, e), e), e)
        for layer in self.up:
            if isinstance(layer, nn.Upsample):
                h = layer(h)
            else:
                h = layer[0](torch.cat([h, hs.pop()], 1), e)
                h = layer[1](h, e) if layer[1] is not None else h
        a = self.alphas_cumprod[t][:, None, None, None]          # eps = skip * x_t + scale * network
        var = a * self.x_std ** 2 + 1 - a
        return (1 - a).sqrt() / var * x[..., :H, :W] + (a / var).sqrt() * self.x_std * self.out(h)[..., :H, :W]


def build_networks(cfg):
    """{'unet': the network} described by a checkpoint's args (missing keys: the values of older checkpoints)."""
    cfg = {**OLD, **cfg}
    return {"unet": UNet(width=cfg["width"], mults=[int(m) for m in str(cfg["mults"]).split(",")], n_res=cfg["n_res"],
                         attn_levels=cfg["attn_levels"], heads=cfg["heads"])}


def build_model(cfg):
    return build_networks(cfg)["unet"]


# The convolution weights in channels-last (NHWC) memory format, as flow_matching.py: the same arithmetic, and on
# this project's 2-core CPU a 1.3x faster training step (0.86 -> 0.66 s at batch 128, 3 interleaved rounds of 5
# steps, one thread while another run shared the cores).
CHANNELS_LAST = torch.channels_last


# ----------------------------------------------------------------------------------------------------------
# Method: loss and samplers
# ----------------------------------------------------------------------------------------------------------
def ddpm_loss(model, x0, cond, generator):
    """Noise-prediction MSE on a batch of log1p responses x0, t uniform over 0..T-1."""
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = torch.randint(0, T, (len(x0),), generator=generator, device=x0.device)
    ab = model.alphas_cumprod[t][:, None, None, None]
    return F.mse_loss(model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, cond), eps)


def ddim_timesteps(steps):
    """`steps` integer timesteps spread evenly from T-1 down to 0, both included (distinct for steps <= T)."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and {T} (got {steps})")
    return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()


def predict_x0(model, x, t, cond, clip):
    """The model's eps at integer step t and the x0 it implies; with clip, x0 is clipped to the data range
    [0, x_max] and eps recomputed from it, so that (x0, eps) still satisfy x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
    a = model.alphas_cumprod[t]
    eps = model(x, torch.full_like(cond[:, 0], t, dtype=torch.long), cond)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    if clip:
        x0 = torch.minimum(x0.clamp_min(0), model.x_max)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    return x0, eps


class Sampler(data.Sampler):
    """DDIM as one module (bench.py, --export), unrolled for `steps`: counts from cond (n, 9), x_T (n, 1, H, W)
    and, for eta > 0, the fresh noise of every step but the last, step_noise (n, steps - 1, H, W). The schedule
    is indexed with python ints, so the loop has no host syncs (a CUDA graph can capture it)."""

    def __init__(self, model, shape, steps=50, eta=0.7, clip=True):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (got {eta})")
        super().__init__(steps=steps, eta=eta, clip=clip)
        self.model, self.shape, self.ts, self.eta, self.clip = model, tuple(shape), ddim_timesteps(steps), eta, clip
        self.k = steps - 1 if eta > 0 else 0                 # fresh-noise draws

    def noise_shapes(self, n):
        return {"x_T": (n, 1) + self.shape, **({"step_noise": (n, self.k) + self.shape} if self.k else {})}

    def draw(self, n, generator=None, device="cpu"):
        """x_T, then one (n, 1, H, W) draw per step except the last: the order of the ancestral sampler."""
        d = [data.noise((n, 1) + self.shape, generator, device) for _ in range(1 + self.k)]
        return {"x_T": d[0], **({"step_noise": torch.cat(d[1:], 1)} if self.k else {})}

    def forward(self, cond, x, step_noise=None):
        m, ts = self.model, self.ts
        for i, t in enumerate(ts):
            a = m.alphas_cumprod[t]
            a_prev = m.alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(a)   # abar_{-1} = 1
            x0, eps = predict_x0(m, x, t, cond, self.clip)
            sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps
            if self.k and i + 1 < len(ts):
                x = x + sigma * step_noise[:, i:i + 1]
        return data.to_counts(torch.minimum(x.clamp_min(0), m.x_max))


@torch.no_grad()
def sample(model, cond, shape, generator=None, steps=50, eta=0.7, clip=True):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9) by DDIM. Noise is drawn on the CPU
    from `generator` and moved to the model's device, so a seed gives the same samples on any device: first x_T,
    then (for eta > 0) one draw per step except the last, the order of the ancestral sampler."""
    return Sampler(model, shape, steps, eta, clip).run(cond, generator)


@torch.no_grad()
def ddpm_ancestral(model, cond, shape, generator=None, clip=True):
    """Reference: the ancestral DDPM sampler of Ho et al. 2020 over all T steps, x_{t-1} = posterior mean of
    q(x_{t-1} | x_t, x0) + sqrt(beta_tilde_t) z. It equals sample(..., steps=T, eta=1) for the same generator
    (the same algebra written differently; a test checks it)."""
    dev, abar = cond.device, model.alphas_cumprod
    x = data.noise((len(cond), 1) + tuple(shape), generator, dev)
    for t in range(T - 1, -1, -1):
        x0, _ = predict_x0(model, x, t, cond, clip)
        a_prev = abar[t - 1] if t > 0 else torch.ones_like(abar[0])
        beta = 1 - abar[t] / a_prev                                     # beta_t, from the stored schedule
        x = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - abar[t])
        if t > 0:
            x = x + ((1 - a_prev) / (1 - abar[t]) * beta).sqrt() * data.noise(x.shape, generator, dev)
    return data.to_counts(torch.minimum(x.clamp_min(0), model.x_max))


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------
def lr_factor(schedule, warmup, planned):
    """step -> LR multiplier: linear warm-up over `warmup` ("N" steps or "P%" of `planned`), then constant or a
    cosine decay to 0 at `planned`."""
    w = planned * int(warmup[:-1]) / 100 if warmup.endswith("%") else int(warmup)

    def f(s):
        ramp = min(1.0, (s + 1) / w) if w > 0 else 1.0
        return ramp * (0.5 * (1 + math.cos(math.pi * min(s / planned, 1.0))) if schedule == "cosine" else 1.0)
    return f


def ema_update(ema, model, decay, step):
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):       # parameters only: not the schedule buffers
            pe.lerp_(pm, 1 - d)


def generator_fn(model, shape, device, steps, eta, amp=False):
    """The (cond, generator) -> counts callable that metrics.evaluate expects."""
    def generate(cond, g):
        with data.autocast(device, amp):
            return sample(model, cond.to(device), shape, g, steps, eta).float()
    return generate


def train(args):
    dist = data.dist_init(args.device)                   # torchrun: this rank (data.py); plain python: world 1
    dev = dist.device
    data.seed_everything(args.seed)
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    ck = None
    if ckpt_path.exists() and not args.resume:
        raise data.DataError(f"{ckpt_path} exists: pass --resume to continue it, or --out a new folder")
    if args.resume and ckpt_path.exists():
        ck = data.load_checkpoint(ckpt_path, NAME)
        args = data.resume_args(args, ck, older=OLD)
    elif args.resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    data.check_batch(args.batch_size, dist)
    split = data.load_split(vars(args), dist=dist)
    shape = data.SHAPES[args.detector]
    x_tr, c_tr = split.x("train"), split.cond("train")
    x_va, c_va = split.x("val")[:2000], split.cond("val")[:2000]
    model = build_model(vars(args)).to(dev, memory_format=CHANNELS_LAST)
    model.x_max.fill_(x_tr.max()), model.x_std.fill_(x_tr.std())  # data range (x0 clipping), scale (eps skip)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(float(b) for b in args.betas.split(",")),
                            eps=args.adam_eps, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    planned = args.epochs * steps_per_epoch               # the LR schedule spans --epochs; --max-steps stops early
    total = min(planned, args.max_steps or planned)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.schedule, args.warmup, planned))
    scaler = torch.amp.GradScaler(enabled=args.amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported())
    noise = torch.Generator(dev).manual_seed(args.seed)
    step, epoch = 0, 0
    if ck is not None:
        model.load_state_dict(ck["weights"]), ema.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"]), scaler.load_state_dict(ck["scaler"])
        noise.set_state(ck["rng"]["noise"]), torch.set_rng_state(ck["rng"]["torch"])
        step, epoch = ck["step"], ck["epoch"]
        print(f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
    net = data.wrap_ddp(model, dist)      # the training step's UNet: this rank's shard of each global batch, DDP
    n_par = sum(p.numel() for p in model.parameters())
    print(f"{NAME}: {n_par:,} parameters, {len(x_tr):,} training responses, {steps_per_epoch} steps per epoch, "
          f"{total} steps in total, device {dev}")

    def save():
        data.save_checkpoint(dict(model=NAME, args=vars(args), data=split.state(), weights=model.state_dict(),
                                  ema=ema.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                                  scaler=scaler.state_dict(), step=step, epoch=epoch, n_params=n_par,
                                  rng=dict(noise=noise.get_state(), torch=torch.get_rng_state())), ckpt_path)

    def validate(losses):
        with torch.no_grad():
            g = torch.Generator(dev).manual_seed(1234)
            val = np.mean([ddpm_loss(ema, x.to(dev), c.to(dev), g).item()
                           for x, c in data.batches((x_va, c_va), 500, shuffle=False)])
            k = min(500, len(x_va))                     # 25k network evaluations at 50 steps
            gen = sample(ema, c_va[:k].to(dev), shape, torch.Generator().manual_seed(0), args.steps, args.eta)
            val_w = metrics.wasserstein(split.counts("val")[:k], gen)[0]
        row = dict(step=step, epoch=step / steps_per_epoch, train_loss=float(np.mean(losses)) if losses else None,
                   val_loss=float(val), val_W=val_w, minutes=(time.time() - t_start) / 60)
        data.log_jsonl(out / "metrics.jsonl", **row)
        print(f"step {step:6d}  epoch {row['epoch']:.2f}  train loss {row['train_loss'] or float('nan'):.4f}  "
              f"val loss {val:.4f}  val W ({k} samples) {val_w:.3f}  {row['minutes']:.1f} min")

    t_start = time.time()
    while step < total:
        order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)   # batch order of this epoch
        skip = step - epoch * steps_per_epoch                                # batches already done (resume)
        bar = tqdm(data.batches((x_tr, c_tr), args.batch_size, order, start=skip), total=steps_per_epoch,
                   initial=skip, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.smoke or not dist.is_main)
        losses = []
        for x, c in bar:
            x, c = x.to(dev), c.to(dev)
            with data.autocast(dev, args.amp):
                loss = ddpm_loss(net, x, c, noise)   # DDP equals one process exactly
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}: training diverged (lower --lr?)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(opt), scaler.update(), sched.step()
            ema_update(ema, model, args.ema, step)
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % args.ckpt_every == 0:
                save()
            if (step % args.val_every == 0 or step >= total) and dist.is_main:
                bar.clear()
                validate(losses)
                losses = []
            if step >= total:
                break
        bar.close()
        if step == (epoch + 1) * steps_per_epoch:
            epoch += 1
        save()
    print(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min, checkpoint {ckpt_path}")
    data.dist_close(dist)
    return ckpt_path


def load_model(args):
    ck = data.load_checkpoint(args.ckpt or Path(args.out) / "ckpt.pt", NAME, args.detector)
    dev = data.pick_device(args.device)
    model = build_model(ck["args"]).to(dev, memory_format=CHANNELS_LAST)
    model.load_state_dict(ck["ema"])
    return ck, model.eval(), dev


def sample_cmd(args):
    ck, model, dev = load_model(args)
    data.sample_to_file(ck, generator_fn(model, ck["data"]["shape"], dev, args.steps, args.eta, args.amp), args)


def export_cmd(args):
    ck, model, dev = load_model(args)
    data.export_onnx(Sampler(model, ck["data"]["shape"], args.steps, args.eta), ck, args.export, NAME)


def evaluate(args):
    ck, model, dev = load_model(args)
    split = data.split_from_checkpoint(ck)
    ckpt = Path(args.ckpt or Path(args.out) / "ckpt.pt")
    if args.sweep:
        result = metrics.run_sweep(lambda eta, steps: generator_fn(model, ck["data"]["shape"], dev, steps, eta, args.amp),
                                   [dict(eta=e, steps=n) for e in SWEEP_ETAS for n in args.sweep], split,
                                   ckpt.with_name("sweep.json"), args, NAME, cost_keys=["steps"])
        if args.plot:
            metrics.plot_sweep(result, ckpt.with_name("sweep.png"), x="steps", group="eta", xlabel="DDIM steps")
            print(f"plot: {ckpt.with_name('sweep.png')}")
        return result
    gen = generator_fn(model, ck["data"]["shape"], dev, args.steps, args.eta, args.amp)
    path = ckpt.with_name("eval.json" if (args.steps, args.eta) == (50, 0.7) else f"eval_steps{args.steps}_eta{args.eta:g}.json")
    return metrics.run_eval(gen, split, path, args, f"{NAME} (DDIM {args.steps}, eta {args.eta:g})",
                            dict(steps=args.steps, eta=args.eta, n_params=ck["n_params"], train_steps=ck["step"]))


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
