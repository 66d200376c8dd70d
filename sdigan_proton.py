"""SDI-GAN for the ALICE proton Zero Degree Calorimeter (ZP, 56 x 30 fibres), with the paper's ablation.

Paper: Bedkowski, Dubinski, Deja, Rokita 2024, proton ZDC SDI-GAN (arXiv 2406.03263), building on SDI-GAN
(Dubinski et al., ICONIP 2023). On the real proton set (Table 1): GAN 2.48, SDI-GAN 2.36, + intensity
regularisation 2.29, + auxiliary regressor 2.08 (Wasserstein). Where the paper is silent (sizes, optimiser,
batch, epochs), --paper follows the authors' code (Generative-Models-for-CERN-Fast-Simulations,
notebooks/best_models_py/sin-gan-proton-aux-reg-1.py); every setting and its source: docs/fidelity/sdigan_proton.md.

Method (the losses are the paper's in the CPU default too). A conditional DCGAN: G(z, c) maps z ~ N(0, I_10) and
the 9 standardised particle features to a log1p(counts) image (ReLU output); D(x, c) returns a logit. BCE with
the non-saturating G target (eq. 1); fakes are conditioned on a shuffled copy c' of the batch's conditions, and
whatever the additions compare a fake with (diversity target, photon sum, brightest pixel) comes from the real
event that c' came from. One D step, one regressor step, one G step per batch; G loss = eq. 5. `--variant`:
- gan: the adversarial loss only.
- sdi: + lambda_div L_div (eq. 3). f_div(c): the sum over pixels of the per-pixel population std of the raw
  counts of all training responses with exactly condition c, divided by the number of training responses (Sec.
  3.2: "normalized to [0, 1] by dividing by the length of dataset"; --div-norm minmax: the authors' code).
  L_div = mean over the batch of f_div / (d_I / d_z + 1e-5), d_I = L1 distance (sum over pixels) between the
  two generated images G(z1, c'), G(z2, c') (log1p outputs), d_z = L1 distance between z1 and z2. Both images
  come from one generator pass whose two halves share BatchNorm statistics and dropout masks (PairDropout),
  so d_I measures what the noise changes, not dropout noise that sampling switches off; D is not involved.
- sdi-int: + lambda_in L_in (eq. 4): batch mean of |raw photon sum of G(z1, c') - photon sum of the real event|.
- sdi-int-aux (default): + lambda_aux L_aux (eq. 2): a regressor A (small CNN) learns the (row, col) of the
  brightest pixel on real training images; G adds the squared error of A(G(z1, c')) against the real event's
  coordinates, summed over the two coordinates (pixels^2).
Weights (paper Appendix): lambda_div 0.1, lambda_in 1e-10, lambda_aux 1e-3. With the paper's equations these
weights make the intensity term a no-op and the SDI term small. Measured: gradient norms w.r.t. G's parameters on
one training batch of 128, G, D and A from the default run (runs/sdigan_v2_random, 1000 steps): adversarial 1.32,
lambda_div L_div 0.0024 (--div-norm minmax: 0.52), lambda_in L_in 7.9e-9 (the weight used before, 1e-3 divided
by the mean photon sum 21.6, is 4.6e5 times larger: 3.7e-3), lambda_aux L_aux 1.04.
Generator: dense 19 -> 256 -> (w, 20, 10), upsample (3, 2), 2x2 conv 2w, upsample (1, 2), 2x2 conv w, 2x2 conv w/2,
(2, 7) conv to 1 channel, ReLU: exactly 56 x 30 ("valid" convs, as the code). Discriminator: 3x3 convs d and d/2
with max pooling (2, 2) and (2, 1), flatten, concatenate c, dense 128 -> 64 -> logit. Regressor: 3x3 convs a, 2a,
4a, 8a with pooling, dense 2. BatchNorm, dropout (--dropout) and LeakyReLU(0.1) throughout, except in D by
default (`--d-norm none`; --paper keeps it): D sees real and fake batches separately, and BatchNorm over a batch
of fakes hides their overall brightness from D (gan.py's docstring and test), so it cannot punish a generator
whose responses are too faint or empty. G samples in eval mode. --paper: widths 128 / 32 / 32 (6.93M / 0.31M /
0.40M parameters, the code's networks), dropout 0.2, Adam G 1e-4, D 1e-5, regressor 1e-4, betas .9/.999, batch
128, 350 epochs. The CPU default: widths 8, no dropout, G and D lr 2e-4, betas .5/.9 (as gan.py: the slow
published D barely moves in a CPU budget), 1000 steps.

Usage:
    python sdigan_proton.py --train                          # ZP, sdi-int-aux (4.6-5.1 min alone, 2 cores)
    python sdigan_proton.py --train --variant gan --out runs/sdigan_gan      # ablation rows: gan|sdi|sdi-int
    python sdigan_proton.py --train --paper                  # the paper's setting (350 epochs: a GPU job)
    python sdigan_proton.py --sample --ckpt runs/sdigan_proton/ckpt.pt --n 1000 --out samples.npz
    python sdigan_proton.py --export sdigan_proton.onnx --ckpt runs/sdigan_proton/ckpt.pt   # the sampler as one ONNX graph
    python sdigan_proton.py --eval --ckpt runs/sdigan_proton/ckpt.pt [--plot]
    python sdigan_proton.py --train --smoke                  # seconds
The eval table reports the empty-response rate and the diversity error (metrics.py) as the paper does.
Logged every --val-every steps (means since the previous row): d_loss, g_loss (= train_loss, adversarial part
only), d_real / d_fake (mean sigmoid(D) on real / fake images), div_loss, int_loss, aux_loss (the generator's
regularisers, unweighted), d_img (mean d_I), aux_real (regressor loss on real images, pixels^2), and on 1000
validation conditions the Wasserstein (val_W) and the empty-response rate (val_empty).

Measured (`--train --out runs/sdigan_v2_random`, then `--eval --ckpt ... --max-test 2000`, 5 repetitions; ZP random
split, floor 0.289): W 1.596 +- 0.017, 5.52x the floor, 32 % empty responses (the data: 0 %), diversity error 0.99;
before this change (d_I on D's features, min-max f_div, 4.6e5x intensity weight) 1.826 +- 0.109, 6.32x, 28 %, 1.07.
Samples: scattered photons in the right rows, fractional counts, photon sums up to ~150 (the data: ~800).

Deviations from the paper: the CPU default is narrower, has no dropout and no BatchNorm in D, faster optimiser
settings and 1000 steps (0.56 epoch). D, regressor and G are updated one after the other (the code: together,
from one forward pass). The data are the toy ZP set with its >= 1 photon cut and a 70/10/20 split (the paper:
real data, cuts >= 1, 5 or 18, 80:20).
"""
import argparse
import math
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

NAME = "sdigan_proton"
NOISE = 10                                       # latent size k (the authors' code: NOISE_DIM = 10)
VARIANTS = {"gan": set(), "sdi": {"sdi"}, "sdi-int": {"sdi", "int"}, "sdi-int-aux": {"sdi", "int", "aux"}}
# --paper: the paper (lambdas: Appendix; losses: eqs. 1-5) and, where it is silent, the authors' code
# (notebooks/best_models_py/sin-gan-proton-aux-reg-1.py: widths, dropout, Adam, batch, epochs); docs/fidelity
PAPER = dict(epochs=350, batch_size=128, lr=1e-4, d_lr=1e-5, aux_lr=1e-4, betas=[0.9, 0.999], width=128, d_width=32,
             aux_width=32, dropout=0.2, d_norm="batch", lambda_div=0.1, lambda_int=1e-10, lambda_aux=1e-3,
             div_norm="dataset")
# CPU default: the same losses and weights; narrower, faster optimiser, no dropout, no BatchNorm in D, and
# 1000 steps (0.56 epoch) unless --epochs or --max-steps is given
DEFAULTS = dict(PAPER, epochs=1, lr=2e-4, d_lr=2e-4, betas=[0.5, 0.9], width=8, d_width=8, aux_width=8, dropout=0.0,
                d_norm="none")
CPU_STEPS = 1000
PUBLISHED = {}   # the paper states no parameter counts (its Fig. 1 draws the generator without them)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Usage:"):])
    data.add_common_args(p, NAME)
    g = p.add_argument_group("SDI-GAN (--lr is the generator's learning rate; CPU default / --paper in brackets)")
    g.add_argument("--variant", default="sdi-int-aux", choices=list(VARIANTS), help="ablation row (see the docstring)")
    g.add_argument("--width", type=int, default=None, help="generator channels w (dense to w, convs 2w, w, w/2) [8 / 128]")
    g.add_argument("--d-width", type=int, default=None, help="discriminator conv channels d, d/2 [8 / 32]")
    g.add_argument("--aux-width", type=int, default=None, help="auxiliary regressor channels a .. 8a [8 / 32]")
    g.add_argument("--d-lr", type=float, default=None, help="discriminator learning rate [2e-4 / 1e-5]")
    g.add_argument("--aux-lr", type=float, default=None, help="auxiliary regressor learning rate [1e-4 / 1e-4]")
    g.add_argument("--betas", type=float, nargs=2, default=None, help="Adam betas of all three networks "
                   "[.5 .9 / .9 .999]")
    g.add_argument("--lambda-div", type=float, default=None, help="weight of the SDI term, eq. 3 [0.1 / 0.1]")
    g.add_argument("--lambda-int", type=float, default=None, help="weight of the intensity term on raw photon "
                   "sums, eq. 4 [1e-10 / 1e-10]")
    g.add_argument("--lambda-aux", type=float, default=None, help="weight of the auxiliary term, eq. 2 [1e-3 / 1e-3]")
    g.add_argument("--div-norm", choices=["dataset", "minmax"], default=None, help="normalisation of the diversity "
                   "target: divided by the number of training responses (the paper, Sec. 3.2) or min-max scaled "
                   "(the authors' code) [dataset / dataset]")
    g.add_argument("--dropout", type=float, default=None, help="dropout in G, D and the regressor [0 / 0.2]")
    g.add_argument("--d-norm", choices=["batch", "none"], default=None,
                   help="BatchNorm in D (the paper's code) or none: see gan.py's docstring [none / batch]")
    g.add_argument("--val-every", type=int, default=500, help="validate every N steps")
    g.add_argument("--paper", action="store_true", help="the paper's setting (docs/fidelity/sdigan_proton.md)")
    args = p.parse_args(argv)
    if args.detector == "neutron":
        p.error("sdigan_proton.py models the proton calorimeter (ZP 56x30) only: leave --detector out or use "
                "--detector proton (for the neutron calorimeter use gan.py)")
    if args.train:
        args.detector = "proton"
    data.check_args(p, args)
    lambdas = [v for v in (args.lambda_div, args.lambda_int, args.lambda_aux) if v is not None]
    if min(args.d_lr or 1, args.aux_lr or 1) <= 0 or not all(0 <= b < 1 for b in args.betas or []) or min(lambdas + [0]) < 0:
        p.error("--d-lr and --aux-lr must be positive, --betas in [0, 1), the --lambda-* weights >= 0")
    if args.dropout is not None and not 0 <= args.dropout < 1 or args.val_every <= 0:
        p.error("--dropout must be in [0, 1) and --val-every positive")
    for k in ("width", "d_width", "aux_width"):
        v = getattr(args, k)
        if v is not None and (v < 2 or v % 2):
            p.error(f"--{k.replace('_', '-')} must be even and >= 2 (got {v})")
    if not (args.paper or args.smoke) and args.epochs is None and args.max_steps is None:
        args.max_steps = CPU_STEPS
    for k, v in (PAPER if args.paper else DEFAULTS).items():
        if getattr(args, k) is None:   # explicit flag > --paper > CPU default
            setattr(args, k, v)
    if args.smoke:
        args.limit, args.width, args.d_width, args.aux_width = args.limit or 1500, 4, 4, 2
        args.max_steps, args.batch_size = args.max_steps or 6, 32
        args.max_test, args.reps, args.ckpt_every = min(args.max_test or 200, 200), min(args.reps, 2), 3
    args.out = args.out or f"runs/{NAME}"
    return args


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
SHAPE = data.SHAPES["proton"]


class PairDropout(nn.Dropout):
    """nn.Dropout that, while `paired` is set, draws one mask for the first half of the batch and reuses it for the
    second half: the two SDI images G(z1, c), G(z2, c) of a pair then differ by their noise only."""
    paired = False

    def forward(self, x):
        if not (self.paired and self.training and self.p > 0):
            return super().forward(x)
        keep = torch.empty_like(x[:len(x) // 2]).bernoulli_(1 - self.p) / (1 - self.p)
        return x * torch.cat([keep, keep])


def act(n, dropout, dim=2, norm=True):
    """BatchNorm (unless norm=False), dropout, LeakyReLU(0.1): the block tail of the authors' code."""
    bn = (nn.BatchNorm2d(n) if dim == 2 else nn.BatchNorm1d(n)) if norm else nn.Identity()
    return [bn, PairDropout(dropout), nn.LeakyReLU(0.1)]


class Generator(nn.Module):
    def __init__(self, width, dropout, n_cond=9):
        super().__init__()
        w = self.w = width
        self.dense = nn.Sequential(nn.Linear(NOISE + n_cond, 256), *act(256, dropout, 1),
                                   nn.Linear(256, w * 20 * 10), *act(w * 20 * 10, dropout, 1))
        self.conv = nn.Sequential(nn.Upsample(scale_factor=(3, 2)), nn.Conv2d(w, 2 * w, 2), *act(2 * w, dropout),
                                  nn.Upsample(scale_factor=(1, 2)), nn.Conv2d(2 * w, w, 2), *act(w, dropout),
                                  nn.Conv2d(w, w // 2, 2), *act(w // 2, dropout), nn.Conv2d(w // 2, 1, (2, 7)))

    def forward(self, z, cond, paired=False):    # 20x10 -> 60x20 -> 59x19 -> 59x38 -> 58x37 -> 57x36 -> 56x30
        """paired=True: the batch is two halves of SDI pairs, which share their dropout masks (PairDropout)."""
        for m in self.modules():
            if isinstance(m, PairDropout):
                m.paired = paired
        return F.relu(self.conv(self.dense(torch.cat([z, cond], 1)).view(-1, self.w, 20, 10)))


class Discriminator(nn.Module):
    """Logit of "real" for a log1p image and its standardised condition."""

    def __init__(self, width, dropout, norm=True, n_cond=9):
        super().__init__()
        d = width
        self.conv = nn.Sequential(nn.Conv2d(1, d, 3), *act(d, dropout, 2, norm), nn.MaxPool2d(2),            # 27 x 14
                                  nn.Conv2d(d, d // 2, 3), *act(d // 2, dropout, 2, norm), nn.MaxPool2d((2, 1)),  # 12 x 12
                                  nn.Flatten())
        self.feat = nn.Sequential(nn.Linear(d // 2 * 12 * 12 + n_cond, 128), *act(128, dropout, 1, norm),
                                  nn.Linear(128, 64), *act(64, dropout, 1, norm))
        self.out = nn.Linear(64, 1)

    def forward(self, x, cond):
        return self.out(self.feat(torch.cat([self.conv(x), cond], 1)))[:, 0]


class Regressor(nn.Module):
    """(row, col) of the brightest pixel of a log1p image, in pixels."""

    def __init__(self, a, dropout):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, a, 3), *act(a, dropout), nn.MaxPool2d(2),                 # 27 x 14
                                 nn.Conv2d(a, 2 * a, 3), *act(2 * a, dropout), nn.MaxPool2d((2, 1)),    # 12 x 12
                                 nn.Conv2d(2 * a, 4 * a, 3), *act(4 * a, dropout), nn.MaxPool2d((2, 1)),  # 5 x 10
                                 nn.Conv2d(4 * a, 8 * a, 3), *act(8 * a, dropout),                    # 3 x 8
                                 nn.Flatten(), nn.Linear(8 * a * 24, 2))

    def forward(self, x):
        return self.net(x)


def build_model(cfg):
    """The generator described by a checkpoint's args (the network that samples)."""
    return Generator(cfg["width"], cfg["dropout"])


def build_networks(cfg):
    """Every trained network of a checkpoint's args, by name."""
    return dict(generator=build_model(cfg),
                discriminator=Discriminator(cfg["d_width"], cfg["dropout"], cfg.get("d_norm", "batch") == "batch"),
                regressor=Regressor(cfg["aux_width"], cfg["dropout"]))


# ----------------------------------------------------------------------------------------------------------
# Method: diversity target, the three regularisers (eqs. 2-4), one training step, sampler
# ----------------------------------------------------------------------------------------------------------
def diversity_target(counts, cond_id, norm="dataset"):
    """Per event, the paper's f_div (eq. 3): the sum over pixels of the per-pixel population std of the raw
    counts of all responses with the same condition id, normalised (Sec. 3.2) "by dividing by the length of
    dataset" (norm="dataset": by the number of responses given) or min-max scaled to [0, 1] over the conditions
    as the authors' code does (norm="minmax"). float32 (N,)."""
    counts, cond_id = np.asarray(counts), np.asarray(cond_id)
    order = np.argsort(cond_id, kind="stable")
    uniq, start, cnt = np.unique(cond_id[order], return_index=True, return_counts=True)
    div = np.array([counts[order[s:s + n]].reshape(n, -1).astype(np.float64).std(0).sum() for s, n in zip(start, cnt)])
    if norm == "dataset":
        div = div / len(counts)
    else:
        span = div.max() - div.min()
        div = (div - div.min()) / span if span > 0 else np.zeros_like(div)
    return div[np.searchsorted(uniq, cond_id)].astype(np.float32)


def sdi_term(x1, x2, z1, z2, div):
    """Eq. 3: mean over the batch of f_div * (d_I / d_z)^-1, d_I = L1 distance (sum over pixels) between the two
    generated images G(c, z1), G(c, z2) (the generator's log1p output), d_z = L1 distance between the codes. The
    1e-5 guard (the authors' code) bounds the term when both images are equal (e.g. both empty)."""
    d_img = (x1 - x2).abs().flatten(1).sum(1)
    d_z = (z1 - z2).abs().sum(1)
    return (div / (d_img / d_z + 1e-5)).mean(), d_img


def intensity_term(fake, photons):
    """Eq. 4, as a batch mean: |raw photon sum of the generated image - photon sum of the real response|."""
    return (torch.expm1(fake.clamp(max=12)).flatten(1).sum(1) - photons).abs().mean()


def aux_term(pred, coords):
    """Eq. 2: mean over the batch of the squared error of the (row, col) prediction, summed over the 2 coords."""
    return (pred - coords).pow(2).sum(1).mean()


def brightest(counts):
    """(row, col) of the brightest pixel of each image (N, H, W), float32 (N, 2)."""
    counts = np.asarray(counts)
    flat = counts.reshape(len(counts), -1).argmax(1)
    return np.stack([flat // counts.shape[2], flat % counts.shape[2]], 1).astype(np.float32)


def train_step(nets, opts, batch, generator, use, args):
    """One D, regressor and G step on a batch (eq. 5); returns a dict of the logged numbers."""
    gen, disc, aux = nets
    opt_g, opt_d, opt_a = opts
    x, c, div, photons, coords = batch
    dev = x.device
    perm = torch.randperm(len(x), generator=generator, device=generator.device).to(dev)
    fc, div, photons, fake_coords = c[perm], div[perm], photons[perm], coords[perm]
    z1 = data.noise((len(x), NOISE), generator, dev)
    if "sdi" in use:             # both SDI images in one pass: shared BatchNorm statistics and dropout masks
        z2 = data.noise((len(x), NOISE), generator, dev)
        fake, fake2 = gen(torch.cat([z1, z2]), torch.cat([fc, fc]), paired=True).chunk(2)
    else:
        fake = gen(z1, fc)
    bce = F.binary_cross_entropy_with_logits
    real_logit, fake_logit = disc(x, c), disc(fake.detach(), fc)
    d_loss = bce(real_logit, torch.ones_like(real_logit)) + bce(fake_logit, torch.zeros_like(fake_logit))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    log = dict(d_loss=d_loss.item(), d_real=torch.sigmoid(real_logit).mean().item(),
               d_fake=torch.sigmoid(fake_logit).mean().item())
    if "aux" in use:
        a_loss = aux_term(aux(x), coords)                                # the regressor learns on real images
        opt_a.zero_grad(set_to_none=True)
        a_loss.backward()
        opt_a.step()
        log["aux_real"] = a_loss.item()
    g_logit = disc(fake, fc)
    g_loss = bce(g_logit, torch.ones_like(g_logit))                    # non-saturating
    log["g_loss"] = g_loss.item()
    total = g_loss
    if "sdi" in use:
        div_loss, d_img = sdi_term(fake, fake2, z1, z2, div)
        total = total + args.lambda_div * div_loss
        log.update(div_loss=div_loss.item(), d_img=d_img.mean().item())
    if "int" in use:
        int_loss = intensity_term(fake, photons)
        total = total + args.lambda_int * int_loss
        log["int_loss"] = int_loss.item()
    if "aux" in use:
        aux_loss = aux_term(aux(fake), fake_coords)
        total = total + args.lambda_aux * aux_loss
        log["aux_loss"] = aux_loss.item()
    opt_g.zero_grad(set_to_none=True)
    total.backward()
    opt_g.step()
    return log


class Sampler(data.Sampler):
    """The sampler as one module (bench.py, --export): counts from cond (n, 9) and z (n, NOISE)."""

    def __init__(self, gen):
        super().__init__()
        self.gen = gen

    def noise_shapes(self, n):
        return {"z": (n, NOISE)}

    def forward(self, cond, z):
        return data.to_counts(self.gen(z, cond))


@torch.no_grad()
def sample(gen, cond, generator=None):
    """Raw photon counts (n, 56, 30) for standardised conditions `cond` (n, 9). Noise is drawn on the CPU from
    `generator` and moved to the device (a seed gives the same samples anywhere)."""
    return Sampler(gen).run(cond, generator)


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------
def generator_fn(gen, device, amp=False):
    """The (cond, generator) -> counts callable that metrics.evaluate expects."""
    def generate(cond, g):
        with data.autocast(device, amp):
            return sample(gen, cond.to(device), g).float()
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
        args = data.resume_args(args, ck, older=dict(d_norm="batch"))   # before --d-norm, D had BatchNorm
    elif args.resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    use = VARIANTS[args.variant]
    data.check_batch(args.batch_size, dist)
    split = data.load_split(vars(args), dist=dist)
    counts = split.counts("train")
    photons = torch.as_tensor(counts.reshape(len(counts), -1).sum(1, dtype=np.float64), dtype=torch.float32)
    div = torch.as_tensor(diversity_target(counts, split.ds.cond_id[split.idx["train"]], args.div_norm))
    tensors = (split.x("train"), split.cond("train"), div, photons, torch.as_tensor(brightest(counts)))
    c_va = split.cond("val")[:1000]
    nets = tuple(m.to(dev) for m in build_networks(vars(args)).values())
    gen, disc, aux = nets
    opts = tuple(torch.optim.Adam(m.parameters(), lr=lr, betas=tuple(args.betas))
                 for m, lr in zip(nets, (args.lr, args.d_lr, args.aux_lr)))
    steps_per_epoch = max(len(counts) // args.batch_size, 1)   # the last incomplete batch is dropped (BatchNorm)
    planned = args.epochs * steps_per_epoch               # constant learning rates; --max-steps stops early
    total = min(planned, args.max_steps or planned)
    noise = torch.Generator(dev).manual_seed(args.seed)
    step, epoch = 0, 0
    if ck is not None:
        for m, k in zip(nets + opts, ("weights", "disc", "aux", "opt_g", "opt_d", "opt_a")):
            m.load_state_dict(ck[k])
        noise.set_state(ck["rng"]["noise"]), torch.set_rng_state(ck["rng"]["torch"])
        step, epoch = ck["step"], ck["epoch"]
        print(f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
    nets_t = tuple(data.wrap_ddp(m, dist) for m in nets)   # training step: this rank's shard of each global batch, DDP
    n_g, n_d, n_a = (sum(p.numel() for p in m.parameters()) for m in nets)
    print(f"{NAME} ({args.variant}): G {n_g:,} + D {n_d:,} + regressor {n_a:,} parameters, {len(counts):,} training "
          f"responses, {steps_per_epoch} steps per epoch, {total} steps in total, device {dev}")
    if args.amp:
        print("note: --amp is used for sampling only; GAN training runs in float32")

    def save():
        data.save_checkpoint(dict(model=NAME, args=vars(args), data=split.state(), weights=gen.state_dict(),
                                  disc=disc.state_dict(), aux=aux.state_dict(), opt_g=opts[0].state_dict(),
                                  opt_d=opts[1].state_dict(), opt_a=opts[2].state_dict(), step=step, epoch=epoch,
                                  n_params=n_g, rng=dict(noise=noise.get_state(), torch=torch.get_rng_state())), ckpt_path)

    def validate(logs):
        gen.eval()
        gen_counts = sample(gen, c_va.to(dev), torch.Generator().manual_seed(0))
        gen.train()
        val_w = metrics.wasserstein(split.counts("val")[:len(c_va)], gen_counts)[0]
        m = {k: float(np.mean([r[k] for r in logs])) for k in logs[0]} if logs else {}
        row = dict(step=step, epoch=step / steps_per_epoch, train_loss=m.get("g_loss"), **m, val_W=val_w,
                   val_empty=float(((gen_counts >= 0.5).flatten(1).sum(1) == 0).float().mean()),
                   minutes=(time.time() - t_start) / 60)
        data.log_jsonl(out / "metrics.jsonl", **row)
        if logs:
            extra = "".join(f"  {k} {m[k]:.3g}" for k in ("div_loss", "d_img", "int_loss", "aux_loss", "aux_real") if k in m)
            print(f"step {step:6d}  epoch {row['epoch']:.2f}  D loss {m['d_loss']:.3f}  G loss {m['g_loss']:.3f}  "
                  f"D(real) {m['d_real']:.3f}  D(fake) {m['d_fake']:.3f}{extra}  val W {val_w:.3f}  "
                  f"empty {row['val_empty']:.3f}  {row['minutes']:.1f} min")

    t_start = time.time()
    for m in nets:
        m.train()
    while step < total:
        order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)   # batch order of this epoch
        skip = step - epoch * steps_per_epoch                                # batches already done (resume)
        bar = tqdm(data.batches(tensors, args.batch_size, order), total=steps_per_epoch, initial=skip,
                   desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.smoke or not dist.is_main)
        logs = []
        for i, batch in enumerate(bar):
            if i >= steps_per_epoch:
                break
            if i < skip:
                continue
            log = train_step(nets_t, opts, [t.to(dev) for t in batch], noise, use, args)   # DDP = 1 process (not dropout)
            if not all(math.isfinite(v) for v in log.values()):
                raise FloatingPointError(f"non-finite loss at step {step} ({log}): training diverged")
            step += 1
            logs.append(log)
            bar.set_postfix(D=f"{log['d_loss']:.3f}", G=f"{log['g_loss']:.3f}")
            if step % args.ckpt_every == 0:
                save()
            if (step % args.val_every == 0 or step >= total) and dist.is_main:
                bar.clear()
                validate(logs)
                logs = []
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
    gen = build_model(ck["args"]).to(dev)
    gen.load_state_dict(ck["weights"])
    return ck, gen.eval(), dev


def sample_cmd(args):
    ck, gen, dev = load_model(args)
    data.sample_to_file(ck, generator_fn(gen, dev, args.amp), args)


def export_cmd(args):
    ck, gen, dev = load_model(args)
    data.export_onnx(Sampler(gen), ck, args.export, NAME)


def evaluate(args):
    ck, gen, dev = load_model(args)
    split = data.split_from_checkpoint(ck)
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("eval.json")
    variant = ck["args"]["variant"]
    return metrics.run_eval(generator_fn(gen, dev, args.amp), split, path, args, f"{NAME} ({variant})",
                            dict(variant=variant, n_params=ck["n_params"], train_steps=ck["step"]))


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
