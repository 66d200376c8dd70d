"""CorrVAE for the ALICE Zero Degree Calorimeters: responses with requested properties.

Papers: CorrVAE (Wang et al., NeurIPS 2022, arXiv 2210.01796) as applied to ZN in the ML in PL 2023 poster
(Kita, Rogozinski, Bedkowski et al.) and the authors' code (karolrogozinski/cern_alice_fast_sim_corrvae).
The one model here that samples with a requested property: a shower's position, photon sum or size.

Method. An encoder q(z, w | x, c) gives diagonal Gaussians over z (prior N(0, I)) and w (prior p(w | c), an
MLP on the 9 features c); the decoder draws x = log1p(counts) from (z, w) alone. Properties y (`controlled`:
centre of gravity x, y; log1p photon sum; log1p lit pixels; standardised) are read from w through a mask m (a
hard Gumbel sample of logits L in training, their mode at sampling) and invertible predictors f_j:
    u_j = a_j . (m_j * w) + b_j,  y_j = f_j(u_j) = u_j + g_j(u_j),  Lip(g_j) <= 0.5,  f_j^-1: u <- y - g_j(u),
    loss = ||dec(z, w) - x||^2 + beta_t (KL(q(z) || N(0, I)) + KL(q(w) || p(w | c))) + tc (TC(w) + TC(z, w))
           + prop ||f(w) - y||^2 + mask_t sum sigmoid(L) + consist ||props(dec(z, w)) - y||^2 (ours)
           + consist_prior ||props(dec(z', w')) - f(w')||^2 (ours),   z' ~ N(0, I), w' ~ p(w | c);
    beta_t, mask_t: constant, or (--paper) the authors' ramp: KL off for 100k steps, then up to beta.
Sampling: z ~ N(0, I), w ~ p(w | c), counts = expm1(dec(z, w)). A request (--props) inverts each y_j to u_j
and moves the prior draw w0 by the least change giving them: w = w0 + pinv(A) (u - A w0 - b), A_j = a_j m_j.

Usage:
    python corrvae.py --train                        # ZN, CPU default: 2 epochs (3,064 steps), runs/corrvae
    python corrvae.py --train --paper                # the authors' objective, optimiser, batch (250 epochs)
    python corrvae.py --sample --ckpt runs/corrvae/ckpt.pt --n 1000 --out samples.npz
    python corrvae.py --sample --ckpt runs/corrvae/ckpt.pt --props "cog_x=10,sum=500" --out steered.npz
    python corrvae.py --eval --ckpt runs/corrvae/ckpt.pt --max-test 2000 --plot   # with the control table
    python corrvae.py --export corrvae.onnx --ckpt runs/corrvae/ckpt.pt   # the unsteered sampler as ONNX

Every setting beside its source, and the deviations from the paper: docs/fidelity/corrvae.md.
Runs, the control table, what is logged, and their history: docs/models/corrvae.md.
"""
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import spearmanr

import data
import metrics

# ----------------------------------------------------------------------------------------------------------
# Configuration. Precedence: an explicit flag or --set > --smoke > --paper > CPU default
# ----------------------------------------------------------------------------------------------------------
NAME = "corrvae"
PROPS = ["cog_x", "cog_y", "sum", "n_lit"]          # the properties a run may control, natural units
DEFAULTS = dict(epochs=2, batch_size=128, lr=1e-3, width=8, hidden=64, z_dim=8, w_dim=8, schedule="cosine",
                controlled=list(PROPS), beta=4.0, kl_schedule="constant", tc=1.0, prop=100.0, consist=10.0,
                consist_prior=10.0, mask=1.0, tau=0.2, clip=100.0, val_every=500)
PAPER = dict(epochs=250, batch_size=64, lr=1e-4, width=16, hidden=128, z_dim=8, w_dim=8, schedule="step",
             controlled=["cog_x", "cog_y"], beta=6.4, kl_schedule="ramp", tc=6.4e-5, consist=0.0,
             consist_prior=0.0, clip=0.0, max_test=0, reps=3)
SMOKE = dict(limit=1500, width=4, hidden=16, batch_size=32, max_steps=6, max_test=200, reps=2, ckpt_every=3,
             n_control=100)
PUBLISHED = {}   # neither the poster nor the CorrVAE paper states a parameter count for the ZDC networks
DEVIATIONS = ("no condition latent c (so no TC(w, c), TC(c, z), sum/max-pixel loss on c): prior p(w | c)",
              "sampling draws w ~ p(w | c) (authors: w fitted to the centre an XGBoost predicts from c)",
              "the house conv encoder/decoder (1.03M parameters; the authors' 4x4-conv pair: about 1.4M)",
              "linear mask pooling a.(m*w)+b, tanh residual predictor (authors: 8-16-1 MLP, sigmoid)",
              "centre of gravity standardised, prop weight 100 (authors: [0, 1] targets, ~50 in our units)",
              "mask penalty sum sigmoid(L), one logit an entry (authors: L1 of their two-class logits)",
              "TC by the plain minibatch estimator (authors: with stratified importance weights)",
              "Gumbel temperature x0.1 per 10 epochs, smoothly (authors: in steps at epochs 9, 19, ...)")
PROP_FEATURE = [metrics.FEATURES.index(p) for p in PROPS]
LOG_PROPS = [2, 3]                                   # trained on log1p of the sum and the lit-pixel count


# ----------------------------------------------------------------------------------------------------------
# The default network: a conv encoder and decoder, the conditional prior p(w | c), the property predictor
# ----------------------------------------------------------------------------------------------------------
def conv(ci, co, stride=1):
    return nn.Sequential(nn.Conv2d(ci, co, 3, stride, padding=1), nn.LeakyReLU(0.1))


def mlp(i, hidden, o):
    return nn.Sequential(nn.Linear(i, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, o))


class Encoder(nn.Module):
    """q(z, w | x, c): (mu, logvar) of z and of w."""
    def __init__(self, shape, width, hidden, z_dim, w_dim, n_cond=9):
        super().__init__()
        self.shape = tuple(shape)
        self.z_dim = z_dim
        flat = 2 * width * math.ceil(shape[0] / 4) * math.ceil(shape[1] / 4)
        self.conv = nn.Sequential(conv(1, width), conv(width, 2 * width, 2), conv(2 * width, 2 * width, 2),
                                  nn.Flatten())
        self.head = mlp(flat + n_cond, hidden, 2 * (z_dim + w_dim))

    def forward(self, x, cond):
        H, W = self.shape
        mu, logvar = self.head(torch.cat([self.conv(F.pad(x, (0, -W % 4, 0, -H % 4))), cond], 1)).chunk(2, 1)
        logvar = logvar.clamp(-20, 10)
        return (mu[:, :self.z_dim], logvar[:, :self.z_dim]), (mu[:, self.z_dim:], logvar[:, self.z_dim:])


class Decoder(nn.Module):
    """p(x | z, w): log1p(counts) images (n, 1, H, W) >= 0."""
    def __init__(self, shape, width, hidden, latent):
        super().__init__()
        self.shape = tuple(shape)
        self.w = width
        self.h0, self.w0 = math.ceil(shape[0] / 4), math.ceil(shape[1] / 4)
        self.head = nn.Sequential(mlp(latent, hidden, 2 * width * self.h0 * self.w0), nn.LeakyReLU(0.1))
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), conv(2 * width, width),
                                nn.Upsample(scale_factor=2), conv(width, width),
                                nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, zw):
        h = self.head(zw).view(-1, 2 * self.w, self.h0, self.w0)
        return F.relu(self.up(h))[..., :self.shape[0], :self.shape[1]]


class Predictor(nn.Module):
    """Mask pooling and the invertible per-property predictors y_j = f_j(a_j . (m_j * w) + b_j)."""
    LIP, ITERS = 0.5, 60

    def __init__(self, n_prop, w_dim, hidden=16):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(n_prop, w_dim))          # mask logits L (authors: randn)
        self.a = nn.Parameter(torch.randn(n_prop, w_dim) / math.sqrt(w_dim))
        self.b = nn.Parameter(torch.zeros(n_prop))
        self.w1 = nn.Parameter(torch.randn(n_prop, hidden))            # g_j: 1-16-1, tanh
        self.b1 = nn.Parameter(torch.zeros(n_prop, hidden))
        self.w2 = nn.Parameter(torch.randn(n_prop, hidden))
        self.b2 = nn.Parameter(torch.zeros(n_prop))

    def mask(self, generator=None, tau=1.0):
        """(n_prop, w_dim) binary mask: a straight-through Gumbel sample (generator given) or the mode, plus
        each property's most likely dimension."""
        if generator is None:
            top = F.one_hot(self.logits.argmax(1), self.logits.shape[1]).float()
            return torch.maximum((self.logits > 0).float(), top)
        u = torch.rand(self.logits.shape, generator=generator, device=generator.device).to(self.logits.device)
        soft = torch.sigmoid((self.logits + torch.log(u) - torch.log1p(-u)) / tau)
        return (soft > 0.5).float() + soft - soft.detach()

    def pool(self, w, mask):
        """(n, n_prop) pooled u_j = a_j . (m_j * w) + b_j."""
        return w @ (self.a * mask).T + self.b

    def g(self, u):
        """The residual part, Lipschitz <= LIP in u: each layer divided by its spectral norm (a vector
        norm)."""
        w1 = self.w1 / self.w1.norm(dim=1, keepdim=True)
        w2 = self.w2 / self.w2.norm(dim=1, keepdim=True)
        return self.LIP * (torch.tanh(u.unsqueeze(-1) * w1 + self.b1) * w2).sum(-1) + self.b2

    def forward(self, w, mask):
        u = self.pool(w, mask)
        return u + self.g(u)

    def invert(self, y):
        """u with u + g(u) = y: fixed-point iteration, a contraction since Lip(g) <= LIP < 1."""
        u = y.clone()
        for _ in range(self.ITERS):
            u = y - self.g(u)
        return u


class CorrVAE(nn.Module):
    def __init__(self, shape, width=8, hidden=64, z_dim=8, w_dim=8, n_cond=9, controlled=PROPS):
        super().__init__()
        self.z_dim = z_dim
        self.w_dim = w_dim
        self.controlled = list(controlled)                                 # the properties w carries
        self.cols = [PROPS.index(p) for p in self.controlled]              # their columns of PROPS
        self.encoder = Encoder(shape, width, hidden, z_dim, w_dim, n_cond)
        self.decoder = Decoder(shape, width, hidden, z_dim + w_dim)
        self.prior = mlp(n_cond, hidden, 2 * w_dim)                       # p(w | c)
        self.predictor = Predictor(len(self.controlled), w_dim)

    def prior_w(self, cond):
        mu, logvar = self.prior(cond).chunk(2, 1)
        return mu, logvar.clamp(-20, 10)


def build_networks(cfg):
    """Every trained network by name (issue 14), the parts of one CorrVAE."""
    return dict(build_model(cfg).named_children())


def build_model(cfg):
    """The network described by a run's settings (or a checkpoint's)."""
    return CorrVAE(data.SHAPES[cfg["detector"]], cfg["width"], cfg["hidden"], cfg["z_dim"], cfg["w_dim"],
                   controlled=cfg.get("controlled", PROPS))


# ----------------------------------------------------------------------------------------------------------
# The method: loss, properties, steering and sampler
# ----------------------------------------------------------------------------------------------------------
def loss_weights(cfg, step=None, off=100_000):
    """(KL weight, mask weight) at a 0-based training step (None: at the end). kl_schedule 'constant': beta,
    mask. 'ramp' (the authors' utils/loss.py): `off` steps of no KL and the mask term; then no mask term and
    a KL weight of beta w_kl / 1e5, their counter w_kl = 100 + 1 before each use (101 first), up to 1e5."""
    if cfg.get("kl_schedule", "constant") == "constant":
        return cfg["beta"], cfg["mask"]
    if step is not None and step < off:
        return 0.0, cfg["mask"]
    return cfg["beta"] * (1.0 if step is None else min(1.0, (step - off + 101) / 1e5)), 0.0


def corrvae_loss(model, x, cond, y, generator, cfg, tau=1.0, stats=None, step=None):
    """(loss, dict of its terms) of a batch, each term averaged over the batch. y: the controlled properties,
    standardised (n, k); stats: (mean, std) tensors of all PROPS' scaling, needed when cfg["consist"] > 0;
    step: for loss_weights. generator=None: posterior means and the mode of the mask (validation)."""
    cols = [PROPS.index(p) for p in cfg.get("controlled", PROPS)]
    beta, mask_weight = loss_weights(cfg, step)
    (mz, lz), (mw, lw) = model.encoder(x, cond)
    if generator is None:
        z, w = mz, mw
    else:
        z = mz + data.noise(mz.shape, generator, x.device) * (0.5 * lz).exp()
        w = mw + data.noise(mw.shape, generator, x.device) * (0.5 * lw).exp()
    dec = model.decoder(torch.cat([z, w], 1))
    rec = (dec - x).pow(2).flatten(1).sum(1).mean()
    consist = rec.new_zeros(())
    if cfg.get("consist", 0) > 0:                                   # ours: the decoded image holds them
        consist = (image_properties(dec, *stats)[:, cols] - y).pow(2).mean(0).sum()
    kl = gaussian_kl(mz, lz).sum(1).mean() + gaussian_kl(mw, lw, *model.prior_w(cond)).sum(1).mean()
    tc_w, tc_zw = total_correlations(z, (mz, lz), w, (mw, lw)) if cfg["tc"] > 0 else (x.new_zeros(()),) * 2
    mask = model.predictor.mask(generator, tau)
    prop = (model.predictor(w, mask) - y).pow(2).mean(0)
    sparsity = torch.sigmoid(model.predictor.logits).sum()
    loss = rec + beta * kl + cfg["tc"] * (tc_w + tc_zw) + cfg["prop"] * prop.sum() + mask_weight * sparsity
    loss = loss + cfg.get("consist", 0) * consist
    prior_term = rec.new_zeros(())
    if cfg.get("consist_prior", 0) > 0 and generator is not None:   # ours: the same on prior draws
        mu_p, lv_p = model.prior_w(cond)
        w_p = (mu_p + data.noise(mu_p.shape, generator, x.device) * (0.5 * lv_p).exp()).detach()
        z_p = data.noise(z.shape, generator, x.device)
        promised = model.predictor(w_p, model.predictor.mask()).detach()   # what sampling (mode mask) promises
        dec_p = model.decoder(torch.cat([z_p, w_p], 1))
        prior_term = (image_properties(dec_p, *stats)[:, cols] - promised).pow(2).mean(0).sum()
        loss = loss + cfg["consist_prior"] * prior_term
    return loss, dict(rec=rec, kl=kl, tc=tc_w + tc_zw, prop=prop.sum(), sparsity=sparsity, consist=consist,
                      consist_prior=prior_term)


def gaussian_kl(mu, logvar, mu_p=None, logvar_p=None):
    """KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)) per dimension, (n, d); prior N(0, I) when none is given."""
    mu_p = torch.zeros_like(mu) if mu_p is None else mu_p
    logvar_p = torch.zeros_like(logvar) if logvar_p is None else logvar_p
    return 0.5 * (logvar_p - logvar + (logvar.exp() + (mu - mu_p) ** 2) / logvar_p.exp() - 1)


def total_correlations(z, z_dist, w, w_dist):
    """(TC among the w dimensions, TC between z and w) of a batch: E[log q(w) - sum_k log q(w_k)] and
    E[log q(z, w) - log q(z) - log q(w)] with each aggregate posterior q estimated by the batch's mixture of
    posteriors (1/M) sum_j q(. | x_j) (beta-TCVAE's minibatch estimator, Chen et al. 2018; the authors' code drops
    the constants, which do not change the gradients). Identical posteriors give exactly 0."""
    def log_density(s, mu, logvar):   # (M, M, d): log N(s_i | mu_j, var_j)
        s, mu, logvar = s[:, None], mu[None], logvar[None]
        return -0.5 * (math.log(2 * math.pi) + logvar + (s - mu) ** 2 / logvar.exp())
    log_m = math.log(len(z))
    lz, lw = log_density(z, *z_dist), log_density(w, *w_dist)
    log_qz, log_qw = torch.logsumexp(lz.sum(2), 1) - log_m, torch.logsumexp(lw.sum(2), 1) - log_m
    log_qzw = torch.logsumexp(lz.sum(2) + lw.sum(2), 1) - log_m
    log_prod_w = (torch.logsumexp(lw, 1) - log_m).sum(1)
    return (log_qw - log_prod_w).mean(), (log_qzw - log_qz - log_qw).mean()


def image_properties(img, mean, std):
    """The standardised properties of decoded log1p images (n, 1, H, W), differentiable: as properties() and
    scale() compute them from counts, except the lit-pixel count, a soft sum of sigmoid(20 (counts - 0.5)) less
    its value at 0 counts."""
    c = torch.expm1(img.float().clamp_min(0)).flatten(0, 1)                       # (n, H, W) photon counts
    H, W = c.shape[1:]
    total = c.sum((1, 2))
    safe = total.clamp_min(1e-3)
    cx = c.sum(2) @ torch.arange(H, dtype=c.dtype, device=c.device) / safe
    cy = c.sum(1) @ torch.arange(W, dtype=c.dtype, device=c.device) / safe
    lit = total > 1e-3                                                              # empty: the image centre
    cx, cy = torch.where(lit, cx, (H - 1) / 2), torch.where(lit, cy, (W - 1) / 2)
    n_lit = (torch.sigmoid(20 * (c - 0.5)) - torch.sigmoid(torch.tensor(-10.0))).sum((1, 2))     # 0 photons: 0
    return (torch.stack([cx, cy, total.log1p(), n_lit.log1p()], 1) - mean) / std


def properties(counts, idx=None, chunk=16384):
    """(N, 4) properties of raw-count responses (or of counts[idx], read in chunks) in natural units:
    cog_x, cog_y (pixels), sum, n_lit."""
    idx = np.arange(len(counts)) if idx is None else np.asarray(idx)
    out = [metrics.shower_features(counts[idx[i:i + chunk]])[:, PROP_FEATURE]
           for i in range(0, len(idx), chunk)]
    return np.concatenate(out) if out else np.zeros((0, len(PROPS)))


def scale(y, mean, std):
    """Natural units -> the standardised training targets (log1p of sum and n_lit first)."""
    y = np.array(y, dtype=np.float64)
    y[:, LOG_PROPS] = np.log1p(y[:, LOG_PROPS])
    return (y - np.asarray(mean)) / np.asarray(std)


def unscale(y, mean, std):
    y = np.asarray(y, dtype=np.float64) * np.asarray(std) + np.asarray(mean)
    y[:, LOG_PROPS] = np.expm1(y[:, LOG_PROPS])
    return y


def steer(model, w0, target):
    """w closest to w0 whose pooled values give the standardised properties `target` (n, k), NaN = free: each
    set y_j is inverted to u_j, then w = w0 + pinv(A) (u - A w0 - b) with rows A_j = a_j * m_j (masked
    dimensions)."""
    cols = ~torch.isnan(target).all(0)
    if not cols.any():
        return w0
    if torch.isnan(target[:, cols]).any():
        raise ValueError("target: a property column must be fully set or fully NaN")
    p = model.predictor
    m = p.mask()
    u = p.invert(target)[:, cols]          # the properties are inverted independently; free columns stay NaN
    A = (p.a * m)[cols]
    return w0 + (u - p.pool(w0, m)[:, cols]) @ torch.linalg.pinv(A).T


class Sampler(data.Sampler):
    """The sampler as one module (bench.py, --export): counts from cond (n, 9), z (n, z_dim) and the prior's
    standard normal eps_w (n, w_dim), w = mu(c) + eps_w sigma(c). `target` (n, k; the k controlled properties,
    standardised, NaN = free) steers w; without it, the sampler's own `request` (k,) (--sample --props) steers
    every event. Neither is exported."""

    def __init__(self, model, request=None):
        super().__init__()
        self.model = model
        self.request = request

    def noise_shapes(self, n):
        return {"z": (n, self.model.z_dim), "eps_w": (n, self.model.w_dim)}

    def forward(self, cond, z, eps_w, target=None):
        mu, logvar = self.model.prior_w(cond)
        w = mu + eps_w * (0.5 * logvar).exp()
        if target is None and self.request is not None:
            target = self.request.expand(len(cond), -1)
        if target is not None:
            w = steer(self.model, w, target.to(cond.device))
        return data.to_counts(self.model.decoder(torch.cat([z, w], 1)))


@torch.no_grad()
def sample(model, cond, generator=None, target=None):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9): z ~ N(0, I), w ~ p(w | c), and
    with `target` (n, k; the controlled properties, standardised, NaN = free) w steered to them. Noise is
    drawn on the CPU from `generator` and moved to the model's device: a seed gives one sample anywhere."""
    s = Sampler(model)
    return s(cond, *s.draw(len(cond), generator, cond.device).values(), target)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def lr_factor(schedule, steps_per_epoch, planned):
    """step -> LR multiplier: the authors' x0.1 at epochs 50, 100, 150, 200 ('step'), or 100 warm-up steps
    and a cosine decay to 0 at `planned` ('cosine')."""
    if schedule == "step":
        return lambda s: 0.1 ** sum(s >= e * steps_per_epoch for e in (50, 100, 150, 200))
    return lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s / planned, 1.0)))


def train(args):
    run = data.Run(args, NAME)                  # resume, data, checkpoints, logging, DDP: data.py Part II
    args, split, dev = run.args, run.split, run.device
    cfg = vars(args)
    x_tr, c_tr = split.x("train"), split.cond("train")
    y_nat = properties(split.ds.images, split.idx["train"])             # property targets, standardised
    y_nat[:, LOG_PROPS] = np.log1p(y_nat[:, LOG_PROPS])
    prop_mean = y_nat.mean(0)
    prop_std = np.maximum(y_nat.std(0), 1e-6)
    cols = [PROPS.index(p) for p in args.controlled]                    # the properties w carries
    y_tr = torch.as_tensor(((y_nat - prop_mean) / prop_std)[:, cols], dtype=torch.float32)
    x_va, c_va = split.x("val")[:2000], split.cond("val")[:2000]
    y_va_nat = properties(split.counts("val")[:2000])
    y_va = torch.as_tensor(scale(y_va_nat, prop_mean, prop_std)[:, cols], dtype=torch.float32)
    stats = tuple(torch.as_tensor(v, dtype=torch.float32, device=dev) for v in (prop_mean, prop_std))
    model = build_model(cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    planned = run.plan(len(x_tr), args.batch_size, sum(p.numel() for p in model.parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.schedule, run.steps_per_epoch, planned))
    scaler = data.grad_scaler(args.amp, dev)
    noise = torch.Generator(dev).manual_seed(args.seed)
    run.extra.update(prop_mean=prop_mean.tolist(), prop_std=prop_std.tolist())   # saved with the checkpoint
    run.keep(weights=model, opt=opt, sched=sched, scaler=scaler, noise=noise)   # in every checkpoint
    net = run.wrap(model)                       # under torchrun: DDP, and still one process's loss exactly

    def validate():                             # val terms (posterior means), val W, control (rank 0)
        model.eval()
        with torch.no_grad():
            parts = [corrvae_loss(model, x.to(dev), c.to(dev), y.to(dev), None, cfg, stats=stats)[1]
                     for x, c, y in data.batches((x_va, c_va, y_va), 500, shuffle=False)]
            terms = {k: float(np.mean([p[k].item() for p in parts])) for k in parts[0]}
            k = min(1000, len(x_va))
            gen = sample(model, c_va[:k].to(dev), torch.Generator().manual_seed(0))
            val_w = metrics.wasserstein(split.counts("val")[:k], gen)[0]
            ctrl = control(model, c_va[:500], y_va_nat[:500], prop_mean, prop_std, dev)
            dims = model.predictor.mask().sum(1).int().tolist()
        model.train()
        return dict(**{f"val_{k}": v for k, v in terms.items()}, mask_dims=dims, val_W=val_w,
                    ctrl_rho=float(np.mean([c["rho"] for c in ctrl.values()])),
                    **{f"rho_{k}": c["rho"] for k, c in ctrl.items()})
    run.validate = validate

    for x, c, y in run.batches((x_tr, c_tr, y_tr)):
        tau = args.tau * 0.1 ** (run.step / (10 * run.steps_per_epoch))   # Gumbel: x0.1 per 10 epochs
        with data.autocast(dev, args.amp):
            loss, terms = corrvae_loss(net, x, c, y, noise, cfg, tau, stats, run.step)   # DDP = 1 process
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if args.clip > 0:                                               # ours: the authors do not clip
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        run.step_done(train_loss=loss, train_prop=terms["prop"])
    return run.finish()


# ==========================================================================================================
# Appendix B. The command line
# ==========================================================================================================
def get_args(argv=None):
    p = data.parser(__doc__, NAME)
    g = p.add_argument_group("CorrVAE")
    g.add_argument("--props", default=None, metavar="NAME=VALUE,...", help="--sample: requested properties, "
                   f"e.g. 'cog_x=10,sum=500' (names {', '.join(PROPS)}; pixels and photons)")
    g.add_argument("--n-control", type=int, default=1000, help="--eval: test particles for the control table")
    args = data.parse(p, argv, DEFAULTS, PAPER, SMOKE)
    for k in ("width", "hidden", "z_dim", "w_dim", "tau", "n_control"):
        if not getattr(args, k) > 0:
            p.error(f"{k} must be positive (got {getattr(args, k)})")
    for k in ("beta", "tc", "prop", "mask", "consist", "consist_prior", "clip"):
        if not getattr(args, k) >= 0:
            p.error(f"{k} must be >= 0 (got {getattr(args, k)})")
    for k, ok in (("schedule", ("cosine", "step")), ("kl_schedule", ("constant", "ramp"))):
        if getattr(args, k) not in ok:
            p.error(f"{k} is {' or '.join(ok)}, not {getattr(args, k)!r}")
    names = args.controlled or []
    if not names or len(set(names)) < len(names) or set(names) - set(PROPS):
        p.error(f"controlled: distinct names among {', '.join(PROPS)} (got {','.join(names)})")
    if args.props is not None:
        if not args.sample or args.export:
            p.error("--props goes with --sample, and not with --export (the exported sampler is unsteered)")
        try:
            args.props = parse_props(args.props)
        except ValueError as e:
            p.error(f"--props {e}")
    return args


def parse_props(text):
    """'cog_x=10,sum=500' -> {'cog_x': 10.0, 'sum': 500.0}; ValueError with a readable message."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in PROPS:
            raise ValueError(f"{item!r}: expected NAME=VALUE with NAME one of {', '.join(PROPS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"{item!r}: {value.strip()!r} is not a number") from None
        if not math.isfinite(out[name]) or (name in ("sum", "n_lit") and out[name] < 0):
            raise ValueError(f"{item!r}: must be finite{' and >= 0' if name in ('sum', 'n_lit') else ''}")
    if not out:
        raise ValueError("empty: give e.g. --props 'cog_x=10,sum=500'")
    return out


def load_sampler(ck, args, device):
    """The Sampler of a checkpoint's weights; with --props, steered to the request on every event."""
    model = build_model(ck["args"]).to(device)
    model.load_state_dict(ck["weights"])
    if not args.props:
        return Sampler(model)
    H, W = data.SHAPES[ck["data"]["detector"]]
    for name, hi in (("cog_x", H - 1), ("cog_y", W - 1)):
        if not 0 <= args.props.get(name, 0) <= hi:
            raise data.DataError(f"--props {name}={args.props[name]}: must lie in [0, {hi}] (pixels) on this "
                                 "detector")
    if set(args.props) - set(model.controlled):
        raise data.DataError(f"--props: this checkpoint controls {', '.join(model.controlled)} only")
    y = np.array([[args.props.get(k, np.nan) for k in PROPS]])
    request = torch.as_tensor(scale(y, ck["prop_mean"], ck["prop_std"])[0, model.cols], dtype=torch.float32)
    print("requested: " + ", ".join(f"{k}={v:g}" for k, v in args.props.items()))
    return Sampler(model, request)


def evaluate(args, ck, sampler, device):
    """metrics.run_eval's table (unsteered samples), with the control table (eval.json "control")."""
    model = sampler.model
    split = data.split_from_checkpoint(ck)
    idx, true, cond = metrics.test_part(split, args.max_test or None)
    k = min(args.n_control, len(idx))
    ctrl = control(model, cond[:k], properties(true[:k]), ck["prop_mean"], ck["prop_std"], device, args.seed)
    print_control(ctrl)
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("eval.json")
    mask = model.predictor.mask().int().tolist()
    result = metrics.run_eval(data.generator(Sampler(model), device, args.amp), split, path, args, NAME,
                              dict(control=ctrl, n_control=k, mask=dict(zip(model.controlled, mask)),
                                   properties=model.controlled,
                                   n_params=ck["n_params"], train_steps=ck["step"]))
    if args.plot:
        plot_traversal(model, cond[:1].to(device), ck, path.with_suffix(".traversal.png"), args.seed)
        print(f"traversal: {path.with_suffix('.traversal.png')}")
    return result


def rank_corr(a, b):
    """Spearman correlation; NaN (without a warning) when either side is constant."""
    return float(spearmanr(a, b)[0]) if np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")


def control(model, cond, y_test, prop_mean, prop_std, device, seed=0):
    """Control accuracy: for each controlled property, requests drawn from the test values y_test (n, 4;
    shuffled with `seed`), one at a time; Spearman and MAE (natural units) of achieved vs requested, and the
    same for unsteered samples. Returns {property: dict(rho, mae, rho_free, mae_free)}."""
    rng = np.random.default_rng(seed)
    free = properties(torch.cat([sample(model, c.to(device), torch.Generator().manual_seed(seed)).cpu()
                                 for c in torch.split(cond, 1024)]))
    out = {}
    for j, (name, col) in enumerate(zip(model.controlled, model.cols)):
        req = y_test[rng.permutation(len(y_test))]
        t = torch.full((len(cond), len(model.cols)), float("nan"))
        t[:, j] = torch.as_tensor(scale(req, prop_mean, prop_std)[:, col], dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        got = properties(torch.cat([sample(model, c.to(device), g, tt).cpu()
                                    for c, tt in zip(torch.split(cond, 1024), torch.split(t, 1024))]))
        r, a, f = req[:, col], got[:, col], free[:, col]
        out[name] = dict(rho=rank_corr(r, a), mae=float(np.abs(r - a).mean()),
                         rho_free=rank_corr(r, f), mae_free=float(np.abs(r - f).mean()))
    return out


def print_control(ctrl):
    print(f"\ncontrol accuracy ({', '.join(ctrl)} requested one at a time; MAE in pixels / photons / "
          "pixels)")
    print(f"{'property':10s} {'Spearman':>9s} {'MAE':>9s}   {'unsteered: Spearman':>20s} {'MAE':>9s}")
    for name, r in ctrl.items():
        print(f"{name:10s} {r['rho']:9.3f} {r['mae']:9.2f}   {r['rho_free']:20.3f} {r['mae_free']:9.2f}")


def plot_traversal(model, cond, ck, path, seed=0, n=7):
    """Rows = properties, columns = requested values (mean -1.645 ... +1.645 std of the standardised training
    values), one particle (cond (1, 9)) and the same noise in every panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    qs = np.linspace(-1.645, 1.645, n)
    rows = len(model.cols)
    fig, axes = plt.subplots(rows, n, figsize=(1.7 * n, 1.9 * rows), squeeze=False)
    for j, (name, col) in enumerate(zip(model.controlled, model.cols)):
        t = torch.full((n, rows), float("nan"))
        t[:, j] = torch.as_tensor(qs, dtype=torch.float32)
        imgs = torch.cat([sample(model, cond, torch.Generator().manual_seed(seed), t[i:i + 1]).cpu()
                          for i in range(n)])
        got = properties(imgs)[:, col]
        req = unscale(np.outer(qs, np.arange(len(PROPS)) == col), ck["prop_mean"], ck["prop_std"])[:, col]
        for i in range(n):
            axes[j, i].imshow(np.log1p(imgs[i].numpy()), cmap="magma")
            axes[j, i].set_xticks([])
            axes[j, i].set_yticks([])
            axes[j, i].set_title(f"{name} {req[i]:.3g}\ngot {got[i]:.3g}", fontsize=7)
    fig.suptitle("corrvae: requested property (rows) at 7 values, one particle, fixed noise; requested vs "
                 "achieved")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    data.main(sys.modules[__name__])
