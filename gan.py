"""Conditional GAN with a postprocessing scale for the ALICE Zero Degree Calorimeters.

Papers: the master's thesis arXiv 2407.16704 (Sec. 3.4, 4.9) and the neutron ZDC VAE/GAN paper arXiv
2306.13606: a conditional GAN with a fitted postprocessing scalar, Wasserstein 5.70 on the real neutron set.

Method. A generator G(z, c) maps noise z ~ N(0, I_10) and the 9 standardised particle features c to
log1p(counts) (ReLU output: exact zeros); a discriminator D(x, c) returns a logit. Fakes are conditioned on
c', a shuffled copy of the batch's conditions. Non-saturating BCE; per batch a D step, then G's through the
new D (--paper, as the authors' code: both losses from one pass, both steps from the old weights):
    L_D = BCE(D(x, c), 1) + BCE(D(G(z, c'), c'), 0),    L_G = BCE(D(G(z, c'), c'), 1).
Postprocessing: after training, a scalar s in [0.9, 1.1] minimises the channel-sum Wasserstein of s * counts
against training events (golden-section search); samples are s * counts. Adversarial training drifts, so the
generator of the lowest validation W is kept beside the last one, with its own s: --sample, --eval and
--export use it unless --weights last (--no-postprocess: s = 1).
CPU default: the conv GAN (G 0.89M; D 0.26M without BatchNorm: with it, D is blind to a batch's brightness),
Adam 2e-4 for both at a constant rate, one epoch. --paper: the thesis' ViT pair (Appendix A, G 915,841,
D 1,422,337), Table A.4's optimisers (G: optax's Nesterov Adam) on one-cycle schedules, 100 epochs.

Usage:
    python gan.py --train                            # ZN, CPU default: the conv GAN, one epoch (~6 min)
    python gan.py --train --paper                    # the thesis: ViT pair, 100 epochs (a GPU job)
    python gan.py --train --paper --arch cnn         # the same with the conv GAN (G 0.89M, D 1.41M)
    python gan.py --eval --ckpt runs/gan/ckpt.pt --max-test 2000 --plot [--weights last] [--no-postprocess]
    python gan.py --sample --ckpt runs/gan/ckpt.pt --n 1000 --out samples.npz
    python gan.py --export gan.onnx --ckpt runs/gan/ckpt.pt      # the sampler as ONNX

Every setting beside its source, and the deviations from the paper: docs/fidelity/gan.md.
Runs, sweeps, ablations and their history: docs/models/gan.md.
"""
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics

# ----------------------------------------------------------------------------------------------------------
# Configuration. Precedence: an explicit flag or --set > --smoke > --paper > CPU default
# ----------------------------------------------------------------------------------------------------------
NAME = "gan"
NOISE = 10
# d_norm: BatchNorm in the conv D ("batch") or none. Schedules: (warm-up fraction, initial div, final div)
# of the one-cycle cosine, or None (a constant rate). lr is G's learning rate, d_lr D's. simultaneous: both
# losses from one forward pass and both steps from the old weights (else G's loss goes through the updated D).
# pp_samples: training events the postprocessing scale is fitted on (0: all).
DEFAULTS = dict(epochs=1, batch_size=128, arch="cnn", width=14, d_width=8, blocks=4, dropout=0.0,
                d_norm=None, lr=2e-4, d_lr=2e-4, g_betas=[0.5, 0.9], d_betas=[0.5, 0.9], g_eps=1e-8,
                d_eps=1e-8, g_nesterov=False, g_sched=None, d_sched=None, val_every=250, pp_samples=20000,
                simultaneous=False)
PAPER = dict(epochs=100, batch_size=256, arch="vit", dropout=0.2, d_norm="batch",           # thesis Table 4.2
             lr=1e-4, d_lr=1.4e-5, g_betas=[0.76, 0.54], d_betas=[0.97, 0.96], g_eps=1.8e-2, d_eps=3.7e-5,
             g_nesterov=True, g_sched=[0.34, 260.0, 9500.0], d_sched=[0.43, 41.0, 1700.0],   # Table A.4
             simultaneous=True, pp_samples=0,                   # m-wojnar/zdc gan.py, postprocessing.py
             protocol="pooled", max_test=0)    # the thesis' test (train_loop): 5 generations pooled, all
SMOKE = dict(limit=1500, max_steps=6, batch_size=32, pp_samples=300, max_test=200, reps=2, ckpt_every=3)
# each backbone's sizes in the layers above (CPU default, --paper, --smoke); width is G's, d_width D's
ARCH = {"cnn": (dict(width=14, d_width=8), dict(width=14, d_width=44), dict(width=4, d_width=4)),
        "vdvae": (dict(width=16, d_width=16), dict(width=64, d_width=64), dict(width=4, d_width=4)),
        "vit": (dict(width=128, d_width=128, blocks=4), dict(width=128, d_width=128, blocks=4),
                dict(width=16, d_width=16, blocks=1))}
_SRC = "our count of the authors' ViT GAN (m-wojnar/zdc gan.py + architectures/vit.py; thesis Sec. 4.9: ~1M)"
PUBLISHED = {"generator": (915_841, _SRC), "discriminator": (1_422_337, _SRC)}
DEVIATIONS = ("torch's default initialisation (the authors' flax: LeCun-normal dense layers, zero biases)",
              "the scale multiplies raw counts (the authors' code: fitted on counts, applied to log1p)",
              "--sample/--eval use the G of the best validation W (the thesis: the last; --weights last)")


# ----------------------------------------------------------------------------------------------------------
# The default network: a conv generator and discriminator (BatchNorm, dropout, LeakyReLU as in the thesis)
# ----------------------------------------------------------------------------------------------------------
def act(n, dropout, dim=2, norm=True):
    """BatchNorm (unless norm=False), dropout, LeakyReLU(0.1): the thesis' block tail."""
    bn = (nn.BatchNorm2d(n) if dim == 2 else nn.BatchNorm1d(n)) if norm else nn.Identity()
    return [bn, nn.Dropout(dropout), nn.LeakyReLU(0.1)]


class Generator(nn.Module):
    """Dense (z, c) -> 256 -> (2w, H/4, W/4), two nearest x2 upsamplings each followed by a 3x3 conv (2w, w
    channels), a 3x3 conv to one channel, ReLU, cropped to H x W (ZP 56x30 is generated at 56x32)."""

    def __init__(self, shape, width, dropout, n_cond=9):
        super().__init__()
        self.shape, self.w = tuple(shape), width
        self.h0, self.w0 = math.ceil(shape[0] / 4), math.ceil(shape[1] / 4)
        flat = 2 * width * self.h0 * self.w0
        self.dense = nn.Sequential(nn.Linear(NOISE + n_cond, 256), *act(256, dropout, 1),
                                   nn.Linear(256, flat), *act(flat, dropout, 1))
        self.conv = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, 2 * width, 3, padding=1),
                                  *act(2 * width, dropout), nn.Upsample(scale_factor=2),
                                  nn.Conv2d(2 * width, width, 3, padding=1), *act(width, dropout),
                                  nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, z, cond):
        h = self.dense(torch.cat([z, cond], 1)).view(-1, 2 * self.w, self.h0, self.w0)
        return F.relu(self.conv(h))[..., :self.shape[0], :self.shape[1]]        # log1p(counts) >= 0


class Discriminator(nn.Module):
    """Two 3x3 convs (w, 2w channels) each with 2x2 max pooling, flatten, concatenate c, dense 128 -> 64 ->
    logit. norm=False drops the BatchNorm (CPU default): D sees the real and the fake batch separately, and
    BatchNorm over a batch of fakes cancels their overall brightness, so D could not punish faint images."""

    def __init__(self, shape, width, dropout, norm, n_cond=9):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), *act(width, dropout, 2, norm),
                                  nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1),
                                  *act(2 * width, dropout, 2, norm), nn.MaxPool2d(2), nn.Flatten())
        flat = 2 * width * (shape[0] // 4) * (shape[1] // 4)
        self.head = nn.Sequential(nn.Linear(flat + n_cond, 128), *act(128, dropout, 1, norm),
                                  nn.Linear(128, 64), *act(64, dropout, 1, norm), nn.Linear(64, 1))

    def forward(self, x, cond):
        return self.head(torch.cat([self.conv(x), cond], 1))[:, 0]


def build_model(cfg):
    """The generator (the network that samples) described by a run's settings (or a checkpoint's)."""
    shape = data.SHAPES[cfg["detector"]]
    if cfg["arch"] == "vit":
        return ViTGenerator(shape, cfg["width"], cfg["blocks"])
    if cfg["arch"] == "vdvae":
        return ConvGenerator(shape, cfg["width"])
    return Generator(shape, cfg["width"], cfg["dropout"])


def build_discriminator(cfg):
    shape = data.SHAPES[cfg["detector"]]
    if cfg["arch"] == "vit":
        return ViTDiscriminator(shape, cfg["d_width"], cfg["blocks"])
    if cfg["arch"] == "vdvae":
        return ConvDiscriminator(shape, cfg["d_width"])
    return Discriminator(shape, cfg["d_width"], cfg["dropout"], cfg["d_norm"] == "batch")


def build_networks(cfg):
    """{'generator': G, 'discriminator': D}, built in this order (the initialisation draws)."""
    return dict(generator=build_model(cfg), discriminator=build_discriminator(cfg))


# ----------------------------------------------------------------------------------------------------------
# The method: losses, sampler, postprocessing scale
# ----------------------------------------------------------------------------------------------------------
def discriminator_loss(disc, x, cond, fake, fake_cond):
    """D's BCE: real pairs (x, c) are 1, fakes (G(z, c'), c') are 0. Also returns both logits."""
    real_logit = disc(x, cond)
    fake_logit = disc(fake, fake_cond)
    bce = F.binary_cross_entropy_with_logits
    loss = bce(real_logit, torch.ones_like(real_logit)) + bce(fake_logit, torch.zeros_like(fake_logit))
    return loss, real_logit, fake_logit


def generator_loss(disc, fake, fake_cond, logit=None):
    """G's non-saturating BCE: its fakes should be taken for real. `logit`: D's output on them where the step
    already has it (the simultaneous step: the pass of D's loss, before D's update)."""
    logit = disc(fake, fake_cond) if logit is None else logit
    return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))


class Sampler(data.Sampler):
    """The sampler as one module (bench.py, --export): counts from cond (n, 9) and z (n, NOISE), times
    `scale`. `weights` says which of a checkpoint's generators it holds (for eval.json)."""

    def __init__(self, gen, scale=1.0, weights="given"):
        super().__init__(scale=scale)
        self.gen, self.scale, self.weights = gen, scale, weights

    def noise_shapes(self, n):
        return {"z": (n, NOISE)}

    def forward(self, cond, z):
        return self.scale * data.to_counts(self.gen(z, cond))


@torch.no_grad()
def sample(gen, cond, generator=None, scale=1.0):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9), times the postprocessing scale.
    Noise is drawn on the CPU from `generator` and moved to the device: a seed gives the same samples on any
    device."""
    return Sampler(gen, scale).run(cond, generator)


def fit_scale(gen_counts, true_counts, lo=0.9, hi=1.1, tol=1e-4):
    """The s in [lo, hi] minimising the channel-sum Wasserstein of s * gen_counts against true_counts, by
    golden-section search (W1(a, s b) is convex in s). Channel sums are linear, so they are computed once."""
    st = metrics.channel_sums(true_counts)
    sg = metrics.channel_sums(gen_counts)

    def w(s):
        return metrics.wasserstein_1d(st, s * sg).mean()
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    wc, wd = w(c), w(d)
    while b - a > tol:
        if wc <= wd:
            b, d, wd = d, c, wc
            c = b - r * (b - a)
            wc = w(c)
        else:
            a, c, wc = c, d, wd
            d = a + r * (b - a)
            wd = w(d)
    return float((a + b) / 2)


def postprocess_fit(gen, split, n, dev, seed):
    """Fit the postprocessing scale on the first n training events (n = 0: all; their own conditions)."""
    gen.eval()
    g = torch.Generator().manual_seed(seed)
    cond, true = split.cond("train")[:n or None], split.counts("train")[:n or None]
    out = torch.cat([sample(gen, c.to(dev), g).cpu() for c in torch.split(cond, 1024)])
    gen.train()
    s = fit_scale(out.numpy(), true)
    before, after = metrics.wasserstein(true, out)[0], metrics.wasserstein(true, s * out)[0]
    data.log(f"postprocessing scale {s:.4f} (train W on {len(true)} events: {before:.3f} -> {after:.3f})")
    return s


def one_cycle(step, total, warmup, div, final_div):
    """LR multiplier of the thesis' schedule (optax.cosine_onecycle_schedule, = torch OneCycleLR 'cos'):
    cosine from 1/div up to 1 over the first `warmup` fraction of `total` steps, then down to
    1/(div * final_div)."""
    w = max(1, round(warmup * total))
    if step < w:
        a, b, f = 1 / div, 1.0, step / w
    else:
        a, b, f = 1.0, 1 / (div * final_div), (step - w) / max(1, total - w)
    return b + (a - b) * 0.5 * (1 + math.cos(math.pi * min(f, 1.0)))


def optimizer(net, lr, betas, eps, nesterov, sched, total):
    """Adam, or with Nesterov momentum optax.adam(nesterov=True): torch's NAdam with its momentum schedule off
    (momentum_decay 1e9: mu = b1 at every step, as optax), no weight decay (Table A.4), and its schedule: the
    one-cycle cosine `sched` = (warm-up fraction, div, final div) over `total` steps, or constant."""
    if nesterov:
        opt = torch.optim.NAdam(net.parameters(), lr=lr, betas=tuple(betas), eps=eps, momentum_decay=1e9)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=lr, betas=tuple(betas), eps=eps)
    factor = (lambda s: one_cycle(s, total, *sched)) if sched else (lambda s: 1.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def train(args):
    run = data.Run(args, NAME)                  # resume, data, checkpoints, logging, DDP: data.py Part II
    args, split, dev = run.args, run.split, run.device
    x_tr, c_tr = split.x("train"), split.cond("train")
    c_va = split.cond("val")[:1000]
    gen, disc = (m.to(dev) for m in build_networks(vars(args)).values())
    n_g = sum(p.numel() for p in gen.parameters())
    n_d = sum(p.numel() for p in disc.parameters())
    planned = run.plan(len(x_tr), args.batch_size, n_g, drop_last=True,   # the last batch dropped (BatchNorm)
                       about=f"G {n_g:,} + D {n_d:,} parameters")
    opt_g, sched_g = optimizer(gen, args.lr, args.g_betas, args.g_eps, args.g_nesterov, args.g_sched, planned)
    opt_d, sched_d = optimizer(disc, args.d_lr, args.d_betas, args.d_eps, False, args.d_sched, planned)
    scaler = data.grad_scaler(args.amp, dev)
    noise = torch.Generator(dev).manual_seed(args.seed)
    run.extra.update(scale=1.0, best=None)      # in every checkpoint too: the scale, the best-by-validation G
    run.keep(weights=gen, disc=disc, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g, sched_d=sched_d,
             scaler=scaler, noise=noise)
    net_g = run.wrap(gen)                       # under torchrun: DDP, and still one process's losses exactly
    net_d = run.wrap(disc)

    def validate():                             # the W of 1000 validation samples; keeps the best G (rank 0)
        gen.eval()
        fake = sample(gen, c_va.to(dev), torch.Generator().manual_seed(0))
        gen.train()
        val_w = metrics.wasserstein(split.counts("val")[:len(c_va)], fake)[0]
        run.extra["best"] = data.track_best(run.extra["best"], run.step, val_w, gen, val_W=val_w)
        return dict(val_W=val_w)
    run.validate = validate

    for x, c in run.batches((x_tr, c_tr)):
        fake_c = c[torch.randperm(len(c), generator=noise, device=noise.device).to(dev)]   # shuffled c
        z = data.noise((len(x), NOISE), noise, dev)
        if args.simultaneous:                   # --paper, as the authors' code: both losses from one pass,
            with data.autocast(dev, args.amp):  # each network's gradient at the other's old weights
                fake = net_g(z, fake_c)
                d_loss, real_logit, fake_logit = discriminator_loss(net_d, x, c, fake, fake_c)
                g_loss = generator_loss(net_d, fake, fake_c, fake_logit)    # through D before its update
            opt_d.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
            scaler.scale(d_loss).backward(inputs=list(disc.parameters()), retain_graph=True)   # D's only
            scaler.scale(g_loss).backward(inputs=list(gen.parameters()))
            scaler.step(opt_d)
            scaler.step(opt_g)
        else:                                   # CPU default: D's step, then G's through the updated D
            with data.autocast(dev, args.amp):
                fake = net_g(z, fake_c)
                d_loss, real_logit, fake_logit = discriminator_loss(net_d, x, c, fake.detach(), fake_c)
            opt_d.zero_grad(set_to_none=True)
            scaler.scale(d_loss).backward()
            scaler.step(opt_d)
            with data.autocast(dev, args.amp):
                g_loss = generator_loss(net_d, fake, fake_c)
            opt_g.zero_grad(set_to_none=True)
            scaler.scale(g_loss).backward()
            scaler.step(opt_g)
        scaler.update()
        sched_g.step()
        sched_d.step()
        d_real = torch.sigmoid(real_logit).mean()   # mean D outputs: ~0.5 both at equilibrium; d_real -> 1
        d_fake = torch.sigmoid(fake_logit).mean()   # and d_fake -> 0: D is winning
        run.step_done(train_loss=g_loss, d_loss=d_loss, g_loss=g_loss, d_real=d_real, d_fake=d_fake)
    if run.dist.is_main:                        # the postprocessing scales: of the last G, of the best G
        run.extra["scale"] = postprocess_fit(gen, split, args.pp_samples, dev, args.seed)
        best = run.extra["best"]
        if best is not None and "scale" not in best:
            if best["step"] == run.step:
                best["scale"] = run.extra["scale"]
            else:
                other = build_model(vars(args)).to(dev)
                other.load_state_dict(best["weights"])
                best["scale"] = postprocess_fit(other, split, args.pp_samples, dev, args.seed)
            data.log(f"best validation at step {best['step']}: val W {best['val_W']:.3f} (--sample/--eval/"
                     f"--export use it; --weights last for step {run.step})")
    run.save()
    return run.finish()


# ==========================================================================================================
# Appendix A. The thesis' backbones, which the CPU default does not build: the ViT pair (--arch vit, the
# default under --paper) and the CNN pair (--arch vdvae), each in the GAN's places as in the authors' code
# ==========================================================================================================
# The thesis' ViT pair (Sec. 4.4; --arch vit), written out in the same words in vae.py, sae_ng.py, gan.py, vqgan.py
PATCH = 8


def vit_grid(shape):
    """Token grid of an image padded to a multiple of 8: ZN 44x44 -> 48x48 -> 6x6 (36 tokens);
    ZP 56x30 -> 56x32
    -> 7x4 (28 tokens)."""
    return math.ceil(shape[0] / PATCH), math.ceil(shape[1] / PATCH)


class TokenAttention(nn.Module):
    """Multi-head self-attention (n, T, dim) -> (n, T, dim): nn.MultiheadAttention's parameters, names and
    initialisation, written out so that an ONNX export keeps the batch size dynamic (the module's own
    traced path
    fixes it, and its fused inference kernel has no ONNX op)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.out_proj = heads, nn.Linear(dim, dim)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        nn.init.xavier_uniform_(self.in_proj_weight), nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):
        T, d = x.shape[1:]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.reshape(-1, T, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, T, d))


class ViTBlock(nn.Module):
    """Pre-LayerNorm transformer block: 4-head self-attention, then an MLP 4x wide with GELU and dropout."""

    def __init__(self, dim, heads=4, dropout=0.1):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = TokenAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViTEncoder(nn.Module):
    """log1p image (n, 1, H, W) [and condition (n, c)] -> tokens (n, T, dim): zero-pad (centred) to a
    multiple of
    8, cut 8x8 patches, project them linearly and add a learned positional embedding; the condition, projected
    linearly, is prepended as the first token; transformer blocks; the condition token dropped; LayerNorm."""

    def __init__(self, shape, dim, blocks=4, n_cond=0, heads=4, dropout=0.1):
        super().__init__()
        self.shape, self.grid = tuple(shape), vit_grid(shape)
        self.patch = nn.Linear(PATCH * PATCH, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(self.grid[0] * self.grid[1], dim))
        self.cond = nn.Linear(n_cond, dim) if n_cond else None
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, dropout) for _ in range(blocks)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, cond=None):
        (H, W), (gh, gw) = self.shape, self.grid
        ph, pw = gh * PATCH - H, gw * PATCH - W
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        x = x.reshape(-1, gh, PATCH, gw, PATCH).transpose(2, 3)          # batch: -1 (a dynamic ONNX batch)
        x = x.reshape(-1, gh * gw, PATCH * PATCH)
        h = self.patch(x) + self.pos
        if self.cond is not None:
            h = torch.cat([self.cond(cond)[:, None], h], 1)
        h = self.blocks(h)
        return self.ln(h[:, 1:] if self.cond is not None else h)


class ViTDecoder(nn.Module):
    """Tokens (n, T, d_in) [and condition (n, c)] -> log1p image (n, 1, H, W) >= 0: linear projection, learned
    positional embedding, the condition token prepended, transformer blocks, the condition token dropped, a
    transposed convolution (kernel = stride = 8) to one channel, ReLU(. + offset) (exact zeros; its gradient
    passes as if linear with straight_through: the same outputs), centre crop."""

    def __init__(self, shape, d_in, dim, blocks=4, n_cond=0, offset=0.0, heads=4, dropout=0.1,
                 straight_through=False):
        super().__init__()
        self.shape, self.grid, self.offset, self.st = tuple(shape), vit_grid(shape), offset, straight_through
        self.proj = nn.Linear(d_in, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(self.grid[0] * self.grid[1], dim))
        self.cond = nn.Linear(n_cond, dim) if n_cond else None
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, dropout) for _ in range(blocks)])
        self.unpatch = nn.ConvTranspose2d(dim, 1, PATCH, PATCH)

    def forward(self, z, cond=None):
        (H, W), (gh, gw) = self.shape, self.grid
        h = self.proj(z) + self.pos
        if self.cond is not None:
            h = torch.cat([self.cond(cond)[:, None], h], 1)
        h = self.blocks(h)
        h = h[:, 1:] if self.cond is not None else h
        img = self.unpatch(h.transpose(1, 2).unflatten(2, (gh, gw))) + self.offset
        img = img + (F.relu(img) - img).detach() if self.st else F.relu(img)   # straight-through
        top, left = (gh * PATCH - H) // 2, (gw * PATCH - W) // 2
        return img[..., top:top + H, left:left + W]

# The thesis' CNN pair (Sec. 4.4; --arch vdvae), written out in the same words in vae.py, sae_ng.py, gan.py
class BottleneckBlock(nn.Module):
    """VDVAE-style residual block: GELU, 1x1 conv to c/4, GELU, 3x3, GELU, 3x3, GELU, 1x1 back to c; plus its
    input."""

    def __init__(self, c):
        super().__init__()
        q = max(c // 4, 1)
        self.net = nn.Sequential(nn.GELU(), nn.Conv2d(c, q, 1), nn.GELU(), nn.Conv2d(q, q, 3, padding=1),
                                 nn.GELU(),
                                 nn.Conv2d(q, q, 3, padding=1), nn.GELU(), nn.Conv2d(q, c, 1))

    def forward(self, x):
        return x + self.net(x)


def conv_grids(shape):
    """Token grids of the CNN pair: the encoder's (three 2x2 average poolings, floored: ZN 44 -> 22 -> 11
    -> 5, 25 tokens; ZP 7x3) and the decoder's (the image and a 2-pixel border for its unpadded 5x5 conv,
    / 8: ZN 6x6)."""
    return (shape[0] // 8, shape[1] // 8), (math.ceil((shape[0] + 4) / 8), math.ceil((shape[1] + 4) / 8))


class ConvEncoder(nn.Module):
    """log1p image (n, 1, H, W) [and condition (n, c)] -> tokens (n, T, 4w [+ c]): three stages of (1x1 conv
    to w, 2w, 4w channels, two bottleneck blocks, BatchNorm, 2x2 average pooling; w = 64 in the thesis),
    LeakyReLU(0.1),
    the condition concatenated to every token."""

    def __init__(self, width=64, n_cond=0):
        super().__init__()
        layers, ci = [], 1
        for c in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(ci, c, 1), BottleneckBlock(c), BottleneckBlock(c), nn.BatchNorm2d(c),
                       nn.AvgPool2d(2)]
            ci = c
        self.net, self.n_cond = nn.Sequential(*layers), n_cond

    def forward(self, x, cond=None):
        h = F.leaky_relu(self.net(x).flatten(2).transpose(1, 2), 0.1)
        return torch.cat([h, cond[:, None].expand(-1, h.shape[1], -1)], 2) if self.n_cond else h


class ConvDecoder(nn.Module):
    """Tokens (n, T, d_in) [and condition (n, c)] -> log1p image (n, 1, H, W) >= 0: the condition
    concatenated to every token, dense to 4w, the tokens as the decoder grid of conv_grids, three stages of
    (1x1 conv to 4w, 2w, w
    channels, nearest x2 upsampling, two bottleneck blocks, BatchNorm), an unpadded 5x5 conv to one channel,
    ReLU(. + offset) (exact zeros; straight-through gradient with straight_through), centre crop (ZN:
    none)."""

    def __init__(self, shape, d_in, width=64, n_cond=0, offset=0.0, straight_through=False):
        super().__init__()
        self.shape, self.grid, self.n_cond = tuple(shape), conv_grids(shape)[1], n_cond
        self.offset, self.st = offset, straight_through
        self.proj = nn.Linear(d_in + n_cond, 4 * width)
        layers, ci = [], 4 * width
        for c in (4 * width, 2 * width, width):
            layers += [nn.Conv2d(ci, c, 1), nn.Upsample(scale_factor=2), BottleneckBlock(c),
                       BottleneckBlock(c),
                       nn.BatchNorm2d(c)]
            ci = c
        self.net = nn.Sequential(*layers, nn.Conv2d(ci, 1, 5))

    def forward(self, z, cond=None):
        (H, W), (gh, gw) = self.shape, self.grid
        if self.n_cond:
            z = torch.cat([z, cond[:, None].expand(-1, z.shape[1], -1)], 2)
        img = self.net(self.proj(z).transpose(1, 2).unflatten(2, (gh, gw))) + self.offset
        img = img + (F.relu(img) - img).detach() if self.st else F.relu(img)   # straight-through
        top, left = (img.shape[-2] - H) // 2, (img.shape[-1] - W) // 2
        return img[..., top:top + H, left:left + W]


class ViTGenerator(nn.Module):
    """--arch vit, as the authors' code: dense (z, c) -> 36 tokens of `width`, the ViT decoder with the
    condition token (dropout 0.1 in its blocks, as the thesis' ViT; `dropout` is the CNN's)."""

    def __init__(self, shape, width, blocks, n_cond=9):
        super().__init__()
        T = vit_grid(shape)[0] * vit_grid(shape)[1]
        self.dense = nn.Sequential(nn.Linear(NOISE + n_cond, T * width), nn.Unflatten(1, (T, width)))
        self.dec = ViTDecoder(shape, width, width, blocks, n_cond, offset=0.5)

    def forward(self, z, cond):
        return self.dec(self.dense(torch.cat([z, cond], 1)), cond)


class ViTDiscriminator(nn.Module):
    """--arch vit, as the authors' code: the ViT encoder with the condition token, a dense 128 per token,
    flatten, dense 128 -> 64 -> logit with GELU (the per-token dense is as wide as the tokens: 128)."""

    def __init__(self, shape, width, blocks, n_cond=9):
        super().__init__()
        T = vit_grid(shape)[0] * vit_grid(shape)[1]
        self.enc = ViTEncoder(shape, width, blocks, n_cond)
        self.head = nn.Sequential(nn.Linear(width, width), nn.Flatten(), nn.Linear(T * width, 128),
                                  nn.GELU(approximate="tanh"), nn.Linear(128, 64),
                                  nn.GELU(approximate="tanh"), nn.Linear(64, 1))

    def forward(self, x, cond):
        return self.head(self.enc(x, cond))[:, 0]


class ConvGenerator(nn.Module):
    """--arch vdvae, the ViT GAN's layout on the thesis' CNN pair: dense (z, c) -> the decoder grid's tokens
    of `width`, the CNN decoder with the condition at every token."""

    def __init__(self, shape, width, n_cond=9):
        super().__init__()
        T = conv_grids(shape)[1][0] * conv_grids(shape)[1][1]
        self.dense = nn.Sequential(nn.Linear(NOISE + n_cond, T * width), nn.Unflatten(1, (T, width)))
        self.dec = ConvDecoder(shape, width, width, n_cond, offset=0.5)

    def forward(self, z, cond):
        return self.dec(self.dense(torch.cat([z, cond], 1)), cond)


class ConvDiscriminator(nn.Module):
    """--arch vdvae: the CNN encoder with the condition at every token, then the ViT discriminator's head."""

    def __init__(self, shape, width, n_cond=9):
        super().__init__()
        T, d = conv_grids(shape)[0][0] * conv_grids(shape)[0][1], 4 * width + n_cond
        self.enc = ConvEncoder(width, n_cond)
        self.head = nn.Sequential(nn.Linear(d, 128), nn.Flatten(), nn.Linear(T * 128, 128),
                                  nn.GELU(approximate="tanh"), nn.Linear(128, 64),
                                  nn.GELU(approximate="tanh"), nn.Linear(64, 1))

    def forward(self, x, cond):
        return self.head(self.enc(x, cond))[:, 0]


# ==========================================================================================================
# Appendix B. The command line
# ==========================================================================================================
def get_args(argv=None):
    p = data.parser(__doc__, NAME)
    g = p.add_argument_group("GAN (--lr is the generator's learning rate; --set d_lr=... D's)")
    g.add_argument("--arch", choices=list(ARCH), help="backbone: cnn (CPU default), vit (the thesis' ViT "
                   "pair, the default under --paper) or vdvae (the thesis' CNN pair)")
    g.add_argument("--weights", choices=["best", "last"], default="best", help="--sample/--eval/--export: "
                   "the generator of the best validation W (with its own scale) or the last one")
    g.add_argument("--no-postprocess", action="store_true", help="--sample/--eval/--export: scale s = 1 "
                   "(--eval writes eval_nopp.json)")
    args = data.parse(p, argv, DEFAULTS, PAPER, SMOKE)
    if args.arch not in ARCH:
        p.error(f"arch is one of {', '.join(ARCH)} (got {args.arch!r})")
    default, paper, smoke = ARCH[args.arch]     # the backbone's sizes: parsed again with them in each layer
    args = data.parse(p, argv, {**DEFAULTS, **default}, {**PAPER, **paper}, {**SMOKE, **smoke})
    betas = args.g_betas + args.d_betas
    for bad, msg in [(not args.d_lr > 0, f"d_lr must be positive (got {args.d_lr})"),
                     (len(betas) != 4 or not all(0 <= b < 1 for b in betas),
                      "g_betas and d_betas take two Adam betas in [0, 1) each"),
                     (not 0 <= args.dropout < 1, f"dropout must be in [0, 1) (got {args.dropout})"),
                     (args.d_norm not in ("batch", None), f"d_norm is batch or none (got {args.d_norm!r})"),
                     (min(args.width, args.d_width, args.blocks) <= 0, "width, d_width, blocks: positive"),
                     (args.pp_samples < 0, f"pp_samples must be >= 0, 0: all (got {args.pp_samples})"),
                     (args.arch == "vit" and (args.width % 4 or args.d_width % 4), f"width {args.width}, "
                      f"d_width {args.d_width}: the ViT's 4 attention heads need multiples of 4"),
                     (any(s is not None and len(s) != 3 for s in (args.g_sched, args.d_sched)),
                      "g_sched and d_sched take warm-up fraction, div, final div (or none)")]:
        if bad:
            p.error(msg)
    return args


def load_sampler(ck, args, device):
    """The Sampler of a checkpoint's generator: the best-by-validation one with its own scale, or with
    --weights last the last one; --no-postprocess: scale 1."""
    gen = build_model(ck["args"]).to(device)
    weights, label = data.pick_weights(ck, args.weights)
    gen.load_state_dict(weights)
    best = ck["best"] if weights is not ck["weights"] else None
    scale = ck["scale"] if best is None else best.get("scale", 1.0)   # a run stopped early has no scale yet
    scale = 1.0 if args.no_postprocess else scale
    data.log(f"{NAME}: generator weights: {label}, postprocessing scale {scale:.4f}")
    return Sampler(gen, scale, label)


def evaluate(args, ck, sampler, device):
    split = data.split_from_checkpoint(ck)
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt")
    path = path.with_name("eval_nopp.json" if args.no_postprocess else "eval.json")
    tag = "no pp" if args.no_postprocess else f"pp {sampler.scale:.3f}"
    return metrics.run_eval(data.generator(sampler, device, args.amp), split, path, args, f"{NAME} ({tag})",
                            dict(scale=sampler.scale, postprocess=not args.no_postprocess,
                                 n_params=ck["n_params"], train_steps=ck["step"], weights=sampler.weights))


if __name__ == "__main__":
    data.main(sys.modules[__name__])
