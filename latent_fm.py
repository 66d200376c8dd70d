"""Latent flow matching for the ALICE Zero Degree Calorimeters: a small VAE, then flow matching in its latent.

Paper: M. Wojnar, "Even Faster Simulations with Flow Matching" (arXiv 2507.18811): latent flow matching is the
fastest generator of the study, 0.008-0.026 ms per sample (A100), at some cost in fidelity against pixels.
Settings the paper leaves open come from the authors' code, github.com/m-wojnar/faster_zdc (JAX).

Method. Stage 1: a convolutional VAE maps x = log1p(counts) (ZN 44x44) to a 4x11x11 latent (ZP: 4x14x8),
    z = mu + sigma eps,   loss = sum over pixels of (dec(z) - x)^2 + kl * KL(N(mu, sigma^2) || N(0, I)).
Stage 2: the training set is encoded (posterior means), scaled to unit std (the factor is kept); a small UNet
v(z, t, c) learns the straight-line velocity from noise to latents, as in flow_matching.py:
    z_t = (1 - t) z0 + t z1,  z0 ~ N(0, I) at t = 0,  loss = ||v(z_t, t, c) - (z1 - z0)||^2,  t ~ U[0, t_max).
Sampling integrates dz/dt = v from t = 0 to 1 (midpoint: two UNet calls per step; Euler: one), unscales and
decodes: counts = expm1(relu(dec(z))), then a Poisson draw around them (default) or as they are (--paper).
An EMA of the UNet's weights samples.
CPU default: 1 + 6 epochs, AdamW 2e-3 with cosine decay, EMA 0.999, midpoint 2 (4 UNet calls).
--paper: VAE 58k parameters, the published UNet (Appendix A: 127,824), 50 + 50 epochs, one-cycle, Euler 8.

Usage:
    python latent_fm.py --train                      # both stages, ZN (~50 min on 2 cores)
    python latent_fm.py --train --stage 1            # only the autoencoder; --stage 2 then continues it
    python latent_fm.py --train --paper              # the paper's sizes and training
    python latent_fm.py --eval --ckpt runs/latent_fm/ckpt.pt --max-test 2000 --plot   # [--sweep 1,2,4,8]
    python latent_fm.py --sample --ckpt runs/latent_fm/ckpt.pt --n 1000 --out samples.npz
    python latent_fm.py --export latent_fm.onnx --ckpt runs/latent_fm/ckpt.pt     # the sampler as ONNX

Every setting beside its source, and the deviations from the paper: docs/fidelity/latent_fm.md.
Runs, sweeps and their history: docs/models/latent_fm.md.
"""
import copy
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics

# ----------------------------------------------------------------------------------------------------------
# Configuration. Precedence: an explicit flag or --set > --smoke > --paper > CPU default
# ----------------------------------------------------------------------------------------------------------
NAME = "latent_fm"
DEFAULTS = dict(epochs=1, epochs2=6, batch_size=128, lr=2e-3, lr2=None, vae_width=20, unet="compact",
                width=20, heads=2, kl=1e-3, t_max=1.0, betas=[0.9, 0.999], betas2=None, weight_decay=0.01,
                schedule="cosine", warmup="100", grad_clip=1.0, ema=0.999, val_every=500)
PAPER = dict(epochs=50, epochs2=50, batch_size=256, lr=2.3e-3, lr2=1.3e-3, vae_width=21, t_max=0.99,
             betas=[0.58, 0.75], betas2=[0.9, 0.6], weight_decay=0.0, schedule="onecycle", warmup="20%",
             grad_clip=0.0, ema=0.0, unet="published", width=8,      # DEFAULTS: lr2, betas2 None = stage 1's
             protocol="pooled", max_test=0)     # --eval: faster_zdc train.py, 5 pooled runs of the test split
SMOKE = dict(limit=1500, vae_width=4, width=4, batch_size=32, max_steps=4, max_test=200, reps=2, ckpt_every=2)
PUBLISHED = {"vae": (59_348, "poster: 'a size of 60k'; faster_zdc zdc/models/autoencoder/variational.py "
                             "VAE: 59,348"),
             "unet": (127_824, "faster_zdc latent_flow_matching.py LatentFMUnet: 127,824 (poster: latent FM "
                               "160k = UNet + decoder 30,888)")}
DEVIATIONS = ("VAE: plain conv blocks at the published size, not the authors' residual/attention VAE",
              "stage 1 without LPIPS and the pretrained-VGG16 hinge discriminator (no ImageNet weights here)",
              "stage 1: sum-MSE + 1e-3 KL, not the code's mean-MSE (gradient normalised to 0.1) + KL",
              "the decoder's output ReLU only when decoding to counts", "latents scaled to unit std",
              "float32 (the code's convs run in bfloat16: --amp)", "dense layers: untruncated LeCun init",
              "the attention drops the condition token (the code: the first pixel, a one-pixel shift)")
ROUNDINGS = ("poisson", "nearest", "none")
SOLVERS = ("euler", "midpoint")
SAMPLER = dict(default=(2, "midpoint", "poisson"), paper=(8, "euler", "none"))   # (steps, solver, rounding)


# ----------------------------------------------------------------------------------------------------------
# The default network: a convolutional VAE (stage 1) and a two-level latent UNet (stage 2)
# ----------------------------------------------------------------------------------------------------------
def groups(ch):
    return math.gcd(ch, 4)


class VAE(nn.Module):
    """x4 downsampling conv VAE: (1, H, W) log1p image <-> (4, H/4, W/4) latent. No ReLU on the decoder's
    output in training: on the 99 %-empty ZP images it dies and stops every gradient
    (docs/models/latent_fm.md); decoding to counts applies it."""

    def __init__(self, width=16, zc=4):
        super().__init__()
        w1, w2 = width, 2 * width

        def block(ci, co, **kw):
            conv = nn.Conv2d(ci, co, 3, padding=1, **kw)
            return nn.Sequential(conv, nn.GroupNorm(groups(co), co), nn.SiLU())
        self.enc = nn.Sequential(block(1, w1), block(w1, w1, stride=2), block(w1, w2),
                                 block(w2, w2, stride=2), nn.Conv2d(w2, 2 * zc, 1))
        self.dec = nn.Sequential(nn.Conv2d(zc, w2, 3, padding=1), nn.SiLU(), block(w2, w2),
                                 nn.Upsample(scale_factor=2), block(w2, w1), nn.Upsample(scale_factor=2),
                                 block(w1, w1), nn.Conv2d(w1, 1, 3, padding=1))

    def encode(self, x):
        H, W = x.shape[-2:]
        mu, logvar = self.enc(F.pad(x, (0, -W % 4, 0, -H % 4))).chunk(2, 1)
        return mu, logvar.clamp(-20, 10)

    def decode(self, z, shape):
        return self.dec(z)[..., :shape[0], :shape[1]]


def timestep_embedding(t, dim, scale=1000.0):
    """Sinusoidal embedding of t in [0, 1], rescaled to t * scale (the published UNet: t itself)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    a = scale * t[:, None].float() * freqs[None]
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
    """{'vae': stage 1, 'unet': stage 2 (published: Appendix A)} of a run's (or a checkpoint's) settings."""
    unet = PublishedLatentUNet if cfg.get("unet") == "published" else LatentUNet
    return {"vae": VAE(cfg["vae_width"]), "unet": unet(width=cfg["width"], heads=cfg["heads"])}


def build_model(cfg):
    """(VAE, latent UNet), the order the Sampler takes them."""
    return tuple(build_networks(cfg).values())


# ----------------------------------------------------------------------------------------------------------
# The method: the two losses and the sampler
# ----------------------------------------------------------------------------------------------------------
def vae_loss(vae, x, generator, kl_weight):
    """Stage 1: squared reconstruction error (summed over pixels, mean over the batch) + kl_weight * KL."""
    mu, logvar = vae.encode(x)
    z = mu + torch.randn(mu.shape, generator=generator, device=x.device) * (0.5 * logvar).exp()
    rec = (vae.decode(z, x.shape[-2:]) - x).pow(2).flatten(1).sum(1).mean()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
    return rec + kl_weight * kl


def fm_loss(unet, z1, cond, generator, t_max=1.0):
    """Stage 2: conditional flow matching on scaled latents: noise at t = 0, data at 1, velocity z1 - z0."""
    z0 = torch.randn(z1.shape, generator=generator, device=z1.device)
    t = t_max * torch.rand(len(z1), generator=generator, device=z1.device)
    tb = t[:, None, None, None]
    return F.mse_loss(unet(((1 - tb) * z0 + tb * z1), t, cond), z1 - z0)


def latent_shape(shape):
    return (4, math.ceil(shape[0] / 4), math.ceil(shape[1] / 4))


class Sampler(data.Sampler):
    """The ODE solver in latent space and the decoder as one module (bench.py, --export), unrolled for
    `steps`: counts from cond (n, 9), the starting latent noise z0 (n, 4, H/4, W/4) and, for Poisson counts,
    the draw's noise u_counts and z_counts (n, H, W)."""

    uniform = ("u_counts",)

    def __init__(self, vae, unet, shape, scale, steps=2, rounding="poisson", solver="midpoint"):
        if rounding not in ROUNDINGS or solver not in SOLVERS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, solver one of {SOLVERS} "
                             f"(got {rounding!r}, {solver!r})")
        super().__init__(steps=steps, solver=solver, nfe=steps * (2 if solver == "midpoint" else 1),
                         latent_scale=float(scale), rounding=rounding)
        self.vae, self.unet = vae, unet
        self.shape, self.scale = tuple(shape), float(scale)
        self.steps, self.rounding, self.solver = steps, rounding, solver

    def noise_shapes(self, n):
        poisson = self.rounding == "poisson"
        counts = {"u_counts": (n,) + self.shape, "z_counts": (n,) + self.shape} if poisson else {}
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


@torch.no_grad()
def encode_all(vae, x, dev, batch=2048):
    """The posterior means of a set of log1p responses (on the CPU)."""
    return torch.cat([vae.encode(b.to(dev))[0].cpu() for b in torch.split(x, batch)])


def ema_update(ema, model, decay, step):
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - d)


def lr_factor(schedule, warmup, planned):
    """step -> LR multiplier. cosine: linear warm-up over `warmup` ("N" steps or "P%" of `planned`), then
    cosine decay to 0. onecycle (optax.cosine_onecycle_schedule, div factors 25 and 1000, the authors' code):
    cosine ramp from 1/25 to 1 over `warmup`, then cosine down to 1/25,000."""
    w = planned * int(warmup[:-1]) / 100 if warmup.endswith("%") else int(warmup)

    def cos(a, b, f):                                                 # a at f = 0 to b at f = 1
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * min(f, 1.0)))

    def f(s):
        if schedule == "onecycle":
            return cos(1 / 25, 1.0, s / w) if s < w else cos(1.0, 1 / 25_000, (s - w) / max(planned - w, 1))
        return (min(1.0, (s + 1) / w) if w > 0 else 1.0) * cos(1.0, 0.0, s / planned)
    return f


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def train(args):
    run = data.Run(args, NAME, resume=args.stage == 2)       # --stage 2 continues --out's stage-1 checkpoint
    args, split, dev = run.args, run.split, run.device
    shape = tuple(data.SHAPES[args.detector])
    x_tr, c_tr = split.x("train"), split.cond("train")
    x_va, c_va = split.x("val")[:2000], split.cond("val")[:2000]
    nets = build_networks(vars(args))
    vae = nets["vae"].to(dev)
    unet = nets["unet"].to(dev)
    ema = copy.deepcopy(unet).requires_grad_(False)
    n_params = sum(p.numel() for m in (vae, unet) for p in m.parameters())
    run.extra["scale"] = 1.0                    # the latents' scale, fixed when stage 2 starts

    # Stage 1: the autoencoder
    opt1 = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=args.betas, weight_decay=args.weight_decay)
    planned = run.plan(len(x_tr), args.batch_size, n_params, stage=1, epochs=args.epochs,
                       about=f"VAE {sum(p.numel() for p in vae.parameters()):,} parameters")
    sched1 = torch.optim.lr_scheduler.LambdaLR(opt1, lr_factor(args.schedule, args.warmup, planned))
    noise1 = torch.Generator(dev).manual_seed(args.seed + 1)
    run.keep(vae=vae, unet=unet, ema=ema, opt1=opt1, sched1=sched1, noise1=noise1)
    total1 = run.total

    def validate1():                            # the loss on validation events, and encode -> decode's W
        g = torch.Generator(dev).manual_seed(1234)
        with torch.no_grad():
            val = np.mean([vae_loss(vae, x.to(dev), g, args.kl).item()
                           for (x,) in data.batches((x_va,), 500, shuffle=False)])
            rec = data.to_counts(F.relu(vae.decode(vae.encode(x_va[:1000].to(dev))[0], shape)))
        return dict(val_loss=float(val), rec_W=metrics.wasserstein(split.counts("val")[:1000], rec)[0])

    if args.stage != 2:
        run.validate = validate1
        net = run.wrap(vae)
        for (x,) in run.batches((x_tr,)):
            with data.autocast(dev, args.amp):
                loss = vae_loss(net, x, noise1, args.kl)
            opt1.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(vae.parameters(), args.grad_clip)
            opt1.step()
            sched1.step()
            run.step_done(train_loss=loss)
    if args.stage == 1:
        return run.finish()

    # Stage 2: flow matching on the frozen VAE's scaled latents
    if run.steps.get("1", 0) < total1:
        raise data.DataError(f"{run.path}: stage 1 is not finished; train it first (--stage 1)")
    vae.eval().requires_grad_(False)
    z_tr = encode_all(vae, x_tr, dev)
    if "2" not in run.steps:                    # a fresh stage 2 fixes the scale
        run.extra["scale"] = float(z_tr.std())
    scale = run.extra["scale"]
    z_tr = z_tr / scale
    z_va = encode_all(vae, x_va, dev) / scale
    data.log(f"latents {tuple(z_tr.shape[1:])}, scale {scale:.4f}")
    opt2 = torch.optim.AdamW(unet.parameters(), lr=args.lr2, betas=args.betas2,
                             weight_decay=args.weight_decay)
    planned = run.plan(len(z_tr), args.batch_size, n_params, stage=2, epochs=args.epochs2,
                       about=f"UNet {sum(p.numel() for p in unet.parameters()):,} parameters")
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lr_factor(args.schedule, args.warmup, planned))
    noise2 = torch.Generator(dev).manual_seed(args.seed + 2)
    run.keep(opt2=opt2, sched2=sched2, noise2=noise2)

    def validate2():                            # the EMA network on validation events
        g = torch.Generator(dev).manual_seed(1234)
        with torch.no_grad():
            val = np.mean([fm_loss(ema, z.to(dev), c.to(dev), g, args.t_max).item()
                           for z, c in data.batches((z_va, c_va), 500, shuffle=False)])
        gen = sample(vae, ema, c_va[:1000].to(dev), shape, scale, torch.Generator().manual_seed(0),
                     args.steps, args.rounding, args.solver)
        return dict(val_loss=float(val), val_W=metrics.wasserstein(split.counts("val")[:1000], gen)[0])
    run.validate = validate2

    net = run.wrap(unet)
    for z, c in run.batches((z_tr, c_tr)):
        with data.autocast(dev, args.amp):
            loss = fm_loss(net, z, c, noise2, args.t_max)
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(unet.parameters(), args.grad_clip)
        opt2.step()
        sched2.step()
        ema_update(ema, unet, args.ema, run.step)
        run.step_done(train_loss=loss)
    return run.finish()


# ==========================================================================================================
# Appendix A. The published latent UNet (--paper; --set unet=published alone): faster_zdc zdc/architectures/
# unet.py, zdc/layers/conv.py at LatentFMUnet's settings (width 8, mults 1/2/4, one block): 127,824 parameters
# ==========================================================================================================
def pconv(cin, cout, k, stride=1, std=None):
    """Bias-free 'same' convolution, weights N(0, std^2) with std = 1 / (cout k^2) unless given."""
    c = nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)
    nn.init.normal_(c.weight, std=1 / (cout * k * k) if std is None else std)
    return c


def plin(cin, cout, std=None):
    """Bias-free dense layer, LeCun-normal weights (flax's default) unless std is given."""
    lin = nn.Linear(cin, cout, bias=False)
    nn.init.normal_(lin.weight, std=cin ** -0.5 if std is None else std)
    return lin


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of every pixel (flax's LayerNorm on NHWC images), eps 1e-6."""

    def __init__(self, ch):
        super().__init__(ch, eps=1e-6)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PubResBlock(nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.n1, self.c1 = ChannelNorm(cin), pconv(cin, cout, 3)
        self.e = plin(emb, cout, std=0.01 / cout)             # the published 1x1 conv on the embedding
        self.n2, self.c2 = ChannelNorm(cout), pconv(cout, cout, 3, std=1e-4 / cout)   # starts near identity
        self.skip = pconv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.c1(F.silu(self.n1(x))) + F.silu(self.e(e))[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class PubAttention(nn.Module):
    """The condition embedding as one token after the d-channel pixels; LayerNorm, bias-free attention with
    `ch` query/key/value features and output back to d, residual; the token is dropped."""

    def __init__(self, d, ch, emb, heads):
        super().__init__()
        self.tok, self.norm, self.heads = plin(emb, d), nn.LayerNorm(d, eps=1e-6), heads
        self.qkv, self.out = plin(d, 3 * ch), plin(ch, d, std=0.2 / ch ** 0.5)

    def forward(self, x, c):
        B, D, H, W = x.shape
        s = torch.cat([x.flatten(2).transpose(1, 2), self.tok(c)[:, None]], 1)          # (B, HW + 1, D)
        q, k, v = self.qkv(self.norm(s)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        s = s + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return s[:, :-1].transpose(1, 2).reshape(B, D, H, W)


class PublishedLatentUNet(nn.Module):
    """Levels of w, 2w, 4w channels, one residual block each (the time embedding into every block); the
    condition enters only as the attention token: before the middle level's block (down, and up on the
    concatenation with the skip) and in the bottleneck. Skips: every block's and attention's output."""

    def __init__(self, zc=4, width=8, heads=2, n_cond=9):
        super().__init__()
        c1, c2, c3, E = width, 2 * width, 4 * width, 2 * width
        self.t_mlp = nn.Sequential(plin(c1, E), nn.SiLU(), plin(E, E))
        self.c_mlp = nn.Sequential(plin(n_cond, E), nn.SiLU(), plin(E, E))
        self.inp, self.d1, self.down1 = pconv(zc, c1, 3), PubResBlock(c1, c1, E), pconv(c1, c1, 3, stride=2)
        self.a2, self.d2 = PubAttention(c1, c2, E, heads), PubResBlock(c1, c2, E)
        self.down2 = pconv(c2, c2, 3, stride=2)
        self.d3, self.m1 = PubResBlock(c2, c3, E), PubResBlock(c3, c3, E)
        self.am, self.m2 = PubAttention(c3, c3, E, heads), PubResBlock(c3, c3, E)
        self.u3, self.up3 = PubResBlock(2 * c3, c3, E), pconv(c3, c3, 3)          # after a nearest x2
        self.ua2, self.u2 = PubAttention(c2 + c3, c2, E, heads), PubResBlock(c1 + c2 + c3, c2, E)
        self.up2, self.u1 = pconv(c2, c2, 3), PubResBlock(c1 + c2, c1, E)
        self.out = nn.Sequential(ChannelNorm(c1), nn.SiLU(), pconv(c1, zc, 1))

    def forward(self, z, t, cond):
        c, e = self.c_mlp(cond), self.t_mlp(timestep_embedding(t, self.inp.out_channels, scale=1.0))
        h1 = self.d1(self.inp(z), e)
        a2 = self.a2(self.down1(h1), c)
        h2 = self.d2(a2, e)
        h3 = self.d3(self.down2(h2), e)
        h = self.u3(torch.cat([h3, self.m2(self.am(self.m1(h3, e), c), e)], 1), e)
        h = self.up3(F.interpolate(h, scale_factor=2.0))[..., :h2.shape[-2], :h2.shape[-1]]
        h = self.u2(torch.cat([a2, self.ua2(torch.cat([h2, h], 1), c)], 1), e)
        h = self.up2(F.interpolate(h, scale_factor=2.0))[..., :h1.shape[-2], :h1.shape[-1]]
        return self.out(self.u1(torch.cat([h1, h], 1), e))


# ==========================================================================================================
# Appendix B. The command line
# ==========================================================================================================
def get_args(argv=None):
    p = data.parser(__doc__, NAME)
    g = p.add_argument_group("latent flow matching")
    g.add_argument("--stage", type=int, choices=[1, 2], help="train only this stage (default: both)")
    g.add_argument("--steps", type=int, help="ODE steps for sampling (CPU default 2, --paper 8)")
    g.add_argument("--solver", choices=SOLVERS, help="ODE solver; midpoint: 2 network calls per step")
    g.add_argument("--rounding", choices=ROUNDINGS, help="decoder output -> counts: a Poisson draw around it "
                   "(CPU default), the nearest whole photon, or as it is (--paper)")
    g.add_argument("--sweep", type=data.positive_ints, metavar="STEPS",
                   help="--eval: quality against speed at these step counts, both solvers (e.g. 1,2,4,8)")
    args = data.parse(p, argv, DEFAULTS, PAPER, SMOKE)
    args.lr2 = args.lr2 or args.lr              # stage 2 takes stage 1's lr and betas unless given
    args.betas2 = args.betas2 or args.betas
    steps = args.steps
    for bad, msg in [(steps is not None and steps <= 0, f"--steps must be positive (got {steps})"),
                     (args.width <= 0 or args.vae_width <= 0 or args.heads <= 0 or args.width % args.heads,
                      "width must be positive and a multiple of heads, vae_width positive"),
                     (not all(len(b) == 2 and all(0 <= x < 1 for x in b) for b in (args.betas, args.betas2)),
                      "betas and betas2 take b1,b2 in [0, 1)"),
                     (args.schedule not in ("cosine", "onecycle"), "schedule is cosine or onecycle"),
                     (not args.warmup.rstrip("%").isdigit(), f"warmup takes N steps or P% ({args.warmup!r})"),
                     (not 0 < args.t_max <= 1, f"t_max must be in (0, 1] (got {args.t_max})"),
                     (not 0 <= args.ema < 1, f"ema must be in [0, 1) (got {args.ema})"),
                     (not args.grad_clip >= 0 or not args.weight_decay >= 0,
                      "grad_clip and weight_decay must be >= 0"),
                     (not args.lr2 > 0, f"lr2 must be positive (got {args.lr2})")]:
        if bad:
            p.error(msg)
    if args.train:                              # validation samples with the run's sampler
        args.steps, args.solver, args.rounding = sampler_for(args, args.paper)
    return args


def sampler_for(args, paper):
    """(steps, solver, rounding): the explicit --steps / --solver / --rounding, else the sampler of the
    checkpoint's setting: the paper's Euler 8 with continuous counts for a --paper model, else midpoint 2
    (4 network calls) with Poisson counts (docs/models/latent_fm.md)."""
    default = SAMPLER["paper" if paper else "default"]
    given = (getattr(args, "steps", None), getattr(args, "solver", None), getattr(args, "rounding", None))
    return tuple(a or d for a, d in zip(given, default))


def load_sampler(ck, args, device):
    """The Sampler of a checkpoint's VAE and EMA UNet weights."""
    if not ck["steps"].get("2"):
        raise data.DataError(f"{args.ckpt}: stage 2 is not trained yet (python {NAME}.py --train --resume)")
    vae, unet = build_model(ck["args"])
    vae.load_state_dict(ck["vae"])
    unet.load_state_dict(ck["ema"])
    args.steps, args.solver, args.rounding = sampler_for(args, ck["args"]["paper"])
    return Sampler(vae.to(device), unet.to(device), ck["data"]["shape"], ck["scale"], args.steps,
                   args.rounding, args.solver)


def evaluate(args, ck, sampler, device):
    split = data.split_from_checkpoint(ck)
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt")
    if args.sweep:
        def make(solver, steps):
            other = Sampler(sampler.vae, sampler.unet, sampler.shape, sampler.scale, steps, args.rounding,
                            solver)
            return data.generator(other, device, args.amp)
        runs = [dict(solver=s, steps=n) for s in SOLVERS for n in args.sweep]
        return metrics.run_sweep(make, runs, split, path.with_name("sweep.json"), args, NAME)
    idx = split.idx["test"][:args.max_test or None]
    with torch.no_grad():                       # stage-1 quality: encode -> decode the test responses
        rec = np.concatenate([data.to_counts(F.relu(sampler.vae.decode(sampler.vae.encode(x.to(device))[0],
                                                                       sampler.shape))).cpu().numpy()
                              for x in torch.split(data.to_log(split.ds.images[idx]), 1024)])
    rec_w = metrics.wasserstein(split.ds.images[idx], rec)[0]
    data.log(f"stage 1 reconstruction Wasserstein (encode -> decode of the test responses): {rec_w:.3f}")
    mine = (args.steps, args.solver, args.rounding)
    default = mine == SAMPLER["paper" if ck["args"]["paper"] else "default"]
    path = path.with_name("eval.json" if default else f"eval_{args.solver}{args.steps}_{args.rounding}.json")
    counts = {"poisson": ", Poisson counts", "nearest": ", whole photons", "none": ""}[args.rounding]
    return metrics.run_eval(data.generator(sampler, device, args.amp), split, path, args,
                            f"{NAME} ({args.solver} {args.steps}{counts})",
                            dict(steps=args.steps, solver=args.solver, rounding=args.rounding,
                                 reconstruction_W=rec_w, n_params=ck["n_params"]))


if __name__ == "__main__":
    data.main(sys.modules[__name__])
