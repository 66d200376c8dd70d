"""One SDI-GAN that simulates both ALICE Zero Degree Calorimeters at once: ZN (44 x 44) and ZP (56 x 30).

Poster: Kita, Rogozinski, Dubinski, Deja, Bedkowski, Wenzel, Rokita, Trzcinski, ML in PL 2023: a modified SDI-GAN
with two generator outputs and a discriminator with two image inputs (and outputs), trained on both calorimeters'
responses to the same particles. Table 1 (Wasserstein / execution time): proton model 8.91 / 8.91 s, neutron
model 9.01 / 10.63 s, joint proton part 6.69 / 0.20 s, joint neutron part 8.76 / 7.37 s: comparable or better
quality at ~50 % of the inference cost. The poster gives no sizes or optimiser: --paper follows the authors'
two-output code (Generative-Models-for-CERN-Fast-Simulations, notebooks/gan_proton_15_2312/
sdi_gan_proton_neutron_2_outputs.py), the SDI and intensity terms the proton SDI-GAN paper (arXiv 2406.03263,
eqs. 3-4) per detector, as sdigan_proton.py. Every setting and its source: docs/fidelity/sdigan_joint.md.

Data (--detector joint, data.load_joint): each event holds both responses of one particle. The toy keeps an
event when either response passes its detector's cut (ZN >= 10, ZP >= 1 photons), so most events pair a bright
response with an empty or faint one; it is exactly the union of the two single-detector toy sets (same random
stream). Real data: a folder with both file pairs whose particles files are identical row by row.

Method. G(z, c), z ~ N(0, I_8), c the 9 standardised features: shared trunk (dense 256, dense to (w, 20, 12),
upsample (3, 2)), then one head per detector of "valid" convs with 2w, w, w/2 channels (ZN kernels (6, 2); ZP
(2, 6), (2, 6), (2, 4)) and a (2, 1) conv to one channel, ReLU: log1p images of exactly 44 x 44 and 56 x 30.
D: one conv branch per image (3x3 convs d, d/2, max pooling), both flattened and concatenated with c, shared
dense 128 -> 64 (the SDI feature layer) -> two logits (ZN, ZP). BCE on both logits, non-saturating G target;
fakes use a shuffled copy c' of the batch's conditions, and the regularisers' targets come from the real event
c' came from. One D step, then one G step per batch. G loss = adversarial + sum over ZN, ZP of
- lambda_div * L_div (eq. 3): batch mean of f_div / (d_I / d_z + 1e-5); f_div(c) = sum over pixels of the
  per-pixel std of that detector's raw counts over the training events with condition c, divided by the number
  of training events (--div-norm minmax: the authors' code); d_I = L1 distance between that detector's two
  images G(z1, c'), G(z2, c') (log1p), from one pass whose halves share BatchNorm and dropout masks; d_z = L1(z1, z2).
- lambda_in * L_in (eq. 4): batch mean of |raw photon sum of G(z1, c') - photon sum of the real event|.
lambda_div 0.1, lambda_in 1e-10 (the paper's; on raw sums a no-op, kept as published). --paper: w 128, d 32,
dropout 0.2, BatchNorm in D, Adam 1e-4 (G and D, betas .9/.999), batch 128, 200 epochs, the whole joint set.
CPU default: w 8, d 8, no dropout, no BatchNorm in D (BatchNorm over a batch of fakes hides their brightness
from D: gan.py, sdigan_proton.py), lr 2e-4, betas .5/.9, CPU_STEPS steps on the first 150,000 joint events.

Usage:
    python sdigan_joint.py --train                          # CPU default (4.7-4.9 min alone, 2 cores)
    python sdigan_joint.py --train --split disjoint --out runs/sdigan_joint_disjoint
    python sdigan_joint.py --train --paper                  # the authors' setting (200 epochs: a GPU job)
    python sdigan_joint.py --sample --ckpt runs/sdigan_joint/ckpt.pt --n 1000 --out samples.npz
    python sdigan_joint.py --export sdigan_joint.onnx --ckpt runs/sdigan_joint/ckpt.pt   # the sampler as one ONNX graph
    python sdigan_joint.py --eval --ckpt runs/sdigan_joint/ckpt.pt [--compare-ckpt GAN_CKPT SDIGAN_PROTON_CKPT]
    python sdigan_joint.py --train --smoke                  # seconds
--sample writes responses_neutron, responses_proton and particles (data.load_joint reads it). --eval prints the
usual table per detector on the joint test events: the model, the joint floor (data.resimulate 'joint': redrawn
while neither response passes its cut), the lookup, and with --compare-ckpt the separate models (gan.py ZN,
sdigan_proton.py ZP) sampled by their own --sample on the same particles (model files never import each
other), with the fraction of those particles each saw in training; then the time per particle (both
responses, batch 256). Writes eval.json (both) and eval_neutron.json / eval_proton.json (metrics.run_eval's
format). Logged every --val-every steps: d_loss, g_loss, d_real / d_fake, div_<det> and d_img_<det> (L_div,
mean d_I), int_<det> (L_in, unweighted), val_W_<det> on 1000 validation events. The generator of the best
validation score (geometric mean of val_W ZN and ZP) is kept in the checkpoint beside the last one: adversarial
training drifts (the default run's val W was best at step 200 of 600, `python metrics.py --curve runs/sdigan_joint`),
and --sample/--eval/--export use the best unless --weights last. Three times the budget on the condition-disjoint
split (`--split disjoint --epochs 3 --max-steps 1800 --out runs/sdigan_joint_3x_disjoint`, 15.1 min; `--eval
--max-test 2000 --plot`, variants/sdigan_joint_3x_budget_*): ZP 7.40x -> 4.51x the floor, but ZN 16.8x -> 63.8x
(W 82 +- 26: overbright outliers in some repetitions; AUC 0.970): validation W spikes twice (steps 400 and 900)
and then sits at the default's level (eval.curve.png): D/G balance, not the budget, is the limit.

Deviations: the authors' code trains on events where both responses have >= 15 photons and puts d_I on D's
feature layer; here issue 17's data (either passes) and the paper's d_I on the images. No auxiliary regressor
(the two-output code has none). The CPU default is narrower and shorter.
"""
import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import metrics

NAME = "sdigan_joint"
DETS = data.JOINT                               # ("neutron", "proton"): head, D branch and logit order
NOISE = 8                                       # latent size (the authors' two-output code: latent_dim = 8)
# --paper: the authors' two-output code where the poster is silent; the SDI/intensity terms as the proton paper
PAPER = dict(epochs=200, batch_size=128, lr=1e-4, d_lr=1e-4, betas=[0.9, 0.999], width=128, d_width=32,
             dropout=0.2, d_norm="batch", lambda_div=0.1, lambda_int=1e-10, div_norm="dataset")
# CPU default: the same losses; narrower, faster optimiser, no dropout, no BatchNorm in D, CPU_STEPS steps
DEFAULTS = dict(PAPER, epochs=1, lr=2e-4, d_lr=2e-4, betas=[0.5, 0.9], width=8, d_width=8, dropout=0.0,
                d_norm="none", limit=150_000)
CPU_STEPS = 600
PUBLISHED = {}   # neither the poster nor its code's comments state a parameter count


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Usage:"):])
    data.add_common_args(p, NAME, detectors=["joint"])
    g = p.add_argument_group("joint SDI-GAN (--lr is the generator's learning rate; CPU default / --paper in brackets)")
    g.add_argument("--width", type=int, default=None, help="generator channels w (trunk w, heads 2w, w, w/2) [8 / 128]")
    g.add_argument("--d-width", type=int, default=None, help="discriminator conv channels d, d/2 per branch [8 / 32]")
    g.add_argument("--d-lr", type=float, default=None, help="discriminator learning rate [2e-4 / 1e-4]")
    g.add_argument("--betas", type=float, nargs=2, default=None, help="Adam betas of G and D [.5 .9 / .9 .999]")
    g.add_argument("--lambda-div", type=float, default=None, help="weight of the SDI term per detector, 0: "
                   "off [0.1 / 0.1]")
    g.add_argument("--lambda-int", type=float, default=None, help="weight of the intensity term on raw photon "
                   "sums per detector [1e-10 / 1e-10]")
    g.add_argument("--div-norm", choices=["dataset", "minmax"], default=None, help="diversity target divided by "
                   "the number of training responses (the paper) or min-max scaled (the authors' code)")
    g.add_argument("--dropout", type=float, default=None, help="dropout in G and D [0 / 0.2]")
    g.add_argument("--d-norm", choices=["batch", "none"], default=None, help="BatchNorm in D [none / batch]")
    g.add_argument("--val-every", type=int, default=100, help="validate (and keep the best generator) every N steps")
    g.add_argument("--weights", choices=["best", "last"], default="best", help="--sample/--eval/--export: the "
                   "generator of the best validation score (geometric mean of val W ZN, ZP) or the last one")
    g.add_argument("--compare-ckpt", nargs="+", default=[], metavar="CKPT", help="--eval: also score these "
                   "separate models (gan.py ZN, sdigan_proton.py ZP checkpoints) on the joint test events")
    g.add_argument("--paper", action="store_true", help="the authors' setting (docs/fidelity/sdigan_joint.md)")
    args = p.parse_args(argv)
    args.detector = "joint"
    data.check_args(p, args)
    lambdas = [v for v in (args.lambda_div, args.lambda_int) if v is not None]
    if (args.d_lr or 1) <= 0 or not all(0 <= b < 1 for b in args.betas or []) or min(lambdas + [0]) < 0:
        p.error("--d-lr must be positive, --betas in [0, 1), the --lambda-* weights >= 0")
    if args.dropout is not None and not 0 <= args.dropout < 1 or args.val_every <= 0:
        p.error("--dropout must be in [0, 1) and --val-every positive")
    for k in ("width", "d_width"):
        v = getattr(args, k)
        if v is not None and (v < 2 or v % 2):
            p.error(f"--{k.replace('_', '-')} must be even and >= 2 (got {v})")
    if not (args.paper or args.smoke) and args.epochs is None and args.max_steps is None:
        args.max_steps = CPU_STEPS
    for k, v in (PAPER if args.paper else DEFAULTS).items():
        if getattr(args, k) is None:   # explicit flag > --paper > CPU default
            setattr(args, k, v)
    if args.smoke:
        args.limit, args.width, args.d_width = min(args.limit or 2000, 2000), 4, 4
        args.max_steps, args.batch_size = args.max_steps or 6, 32
        args.max_test, args.reps, args.ckpt_every = min(args.max_test or 200, 200), min(args.reps, 2), 3
    args.out = args.out or f"runs/{NAME}"
    return args


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
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


def head(w, kernels, dropout):
    """(w, 60, 24) -> (1, H, W): conv 2w, upsample (1, 2), conv w, conv w/2, (2, 1) conv to 1 channel."""
    k1, k2, k3 = kernels
    return nn.Sequential(nn.Conv2d(w, 2 * w, k1), *act(2 * w, dropout), nn.Upsample(scale_factor=(1, 2)),
                         nn.Conv2d(2 * w, w, k2), *act(w, dropout), nn.Conv2d(w, w // 2, k3), *act(w // 2, dropout),
                         nn.Conv2d(w // 2, 1, (2, 1)))


class Generator(nn.Module):
    """(z, c) -> {detector: log1p image (n, 1, H, W)} from one shared trunk and one head per detector."""

    def __init__(self, width, dropout, n_cond=9):
        super().__init__()
        w = self.w = width
        self.trunk = nn.Sequential(nn.Linear(NOISE + n_cond, 256), *act(256, dropout, 1),
                                   nn.Linear(256, w * 20 * 12), *act(w * 20 * 12, dropout, 1))
        self.up = nn.Upsample(scale_factor=(3, 2))                                   # 20 x 12 -> 60 x 24
        self.heads = nn.ModuleDict(dict(neutron=head(w, [(6, 2)] * 3, dropout),            # 55x23 55x46 50x45 45x44
                                        proton=head(w, [(2, 6), (2, 6), (2, 4)], dropout)))  # 59x19 59x38 58x33 57x30

    def forward(self, z, cond, paired=False):
        """paired=True: the batch is two halves of SDI pairs, which share their dropout masks (PairDropout)."""
        for m in self.modules():
            if isinstance(m, PairDropout):
                m.paired = paired
        h = self.up(self.trunk(torch.cat([z, cond], 1)).view(-1, self.w, 20, 12))
        return {det: F.relu(self.heads[det](h)) for det in DETS}


class Discriminator(nn.Module):
    """Two logits of "real" (ZN, ZP) for a pair of log1p images and their standardised condition."""

    def __init__(self, width, dropout, norm=True, n_cond=9):
        super().__init__()
        d = width
        self.branches = nn.ModuleDict({det: nn.Sequential(
            nn.Conv2d(1, d, 3), *act(d, dropout, 2, norm), nn.MaxPool2d(2),
            nn.Conv2d(d, d // 2, 3), *act(d // 2, dropout, 2, norm), nn.MaxPool2d((2, 1)), nn.Flatten()) for det in DETS})
        flat = d // 2 * (9 * 19 + 12 * 12)         # ZN 44x44 -> 9 x 19, ZP 56x30 -> 12 x 12 after the branch
        self.feat = nn.Sequential(nn.Linear(flat + n_cond, 128), *act(128, dropout, 1, norm),
                                  nn.Linear(128, 64), *act(64, dropout, 1, norm))   # the SDI feature layer
        self.out = nn.Linear(64, len(DETS))

    def forward(self, x, cond):
        return self.out(self.feat(torch.cat([self.branches[det](x[det]) for det in DETS] + [cond], 1)))


def build_model(cfg):
    """The generator described by a checkpoint's args (the network that samples)."""
    return Generator(cfg["width"], cfg["dropout"])


def build_networks(cfg):
    """Every trained network of a checkpoint's args, by name."""
    return dict(generator=build_model(cfg),
                discriminator=Discriminator(cfg["d_width"], cfg["dropout"], cfg["d_norm"] == "batch"))


# ----------------------------------------------------------------------------------------------------------
# Method: diversity target, the regularisers, one training step, sampler
# ----------------------------------------------------------------------------------------------------------
def diversity_target(counts, cond_id, norm="dataset"):
    """Per event, the paper's f_div (eq. 3): the sum over pixels of the per-pixel population std of the raw
    counts of all responses with the same condition id, divided by the number of responses given
    (norm="dataset", Sec. 3.2) or min-max scaled over the conditions (norm="minmax", the authors' code)."""
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
    generated images of one detector, d_z = L1 distance between the codes; 1e-5 bounds it for equal images."""
    d_img = (x1 - x2).abs().flatten(1).sum(1)
    return (div / (d_img / (z1 - z2).abs().sum(1) + 1e-5)).mean(), d_img


def intensity_term(fake, photons):
    """Eq. 4, as a batch mean: |raw photon sum of the generated image - photon sum of the real response|."""
    return (torch.expm1(fake.clamp(max=12)).flatten(1).sum(1) - photons).abs().mean()


def train_step(nets, opts, batch, generator, args):
    """One D step and one G step on a batch; returns a dict of the logged numbers."""
    gen, disc = nets
    opt_g, opt_d = opts
    xn, xp, c, *targets = batch
    x = dict(neutron=xn, proton=xp)
    perm = torch.randperm(len(c), generator=generator, device=generator.device).to(c.device)
    fc = c[perm]
    div_n, div_p, ph_n, ph_p = (t[perm] for t in targets)
    div, photons = dict(neutron=div_n, proton=div_p), dict(neutron=ph_n, proton=ph_p)
    z1 = data.noise((len(c), NOISE), generator, c.device)
    if args.lambda_div > 0:      # both SDI images in one pass: shared BatchNorm statistics and dropout masks
        z2 = data.noise((len(c), NOISE), generator, c.device)
        both = gen(torch.cat([z1, z2]), torch.cat([fc, fc]), paired=True)
        fake, fake2 = ({det: v.chunk(2)[i] for det, v in both.items()} for i in (0, 1))
    else:
        fake = gen(z1, fc)
    bce = F.binary_cross_entropy_with_logits
    real_logit, fake_logit = disc(x, c), disc({det: v.detach() for det, v in fake.items()}, fc)
    d_loss = bce(real_logit, torch.ones_like(real_logit)) + bce(fake_logit, torch.zeros_like(fake_logit))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    g_logit = disc(fake, fc)
    g_loss = bce(g_logit, torch.ones_like(g_logit))                    # non-saturating, both logits
    log = dict(d_loss=d_loss.item(), g_loss=g_loss.item(), d_real=torch.sigmoid(real_logit).mean().item(),
               d_fake=torch.sigmoid(fake_logit).mean().item())
    total = g_loss
    for det in DETS:
        if args.lambda_div > 0:
            div_loss, d_img = sdi_term(fake[det], fake2[det], z1, z2, div[det])
            total = total + args.lambda_div * div_loss
            log.update({f"div_{det}": div_loss.item(), f"d_img_{det}": d_img.mean().item()})
        int_loss = intensity_term(fake[det], photons[det])
        total = total + args.lambda_int * int_loss
        log[f"int_{det}"] = int_loss.item()
    opt_g.zero_grad(set_to_none=True)
    total.backward()
    opt_g.step()
    return log


class Sampler(data.Sampler):
    """The sampler as one module (bench.py, --export): (ZN counts, ZP counts) from cond (n, 9) and z (n, NOISE):
    two outputs, counts_neutron (n, 44, 44) and counts_proton (n, 56, 30)."""
    outputs = tuple(f"counts_{det}" for det in DETS)

    def __init__(self, gen):
        super().__init__()
        self.gen = gen

    def noise_shapes(self, n):
        return {"z": (n, NOISE)}

    def forward(self, cond, z):
        out = self.gen(z, cond)
        return tuple(data.to_counts(out[det]) for det in DETS)


@torch.no_grad()
def sample(gen, cond, generator=None):
    """{detector: raw photon counts (n, H, W)} for standardised conditions `cond` (n, 9): both responses of each
    particle from one noise vector. Noise is drawn on the CPU from `generator` (a seed gives the same samples anywhere)."""
    return dict(zip(DETS, Sampler(gen).run(cond, generator)))


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------
def generator_fn(gen, device, det=None, amp=False):
    """The (cond, generator) -> counts callable that metrics.evaluate expects: one detector's responses, or
    (det=None) both, flattened and concatenated per particle (what the timing measures)."""
    def generate(cond, g):
        with data.autocast(device, amp):
            out = sample(gen, cond.to(device), g)
        return out[det].float() if det else torch.cat([out[d].flatten(1) for d in DETS], 1).float()
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
        args = data.resume_args(args, ck)
    elif args.resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    data.check_batch(args.batch_size, dist)
    split = data.load_split(vars(args), dist=dist)
    counts, cid = split.counts("train"), split.ds.cond_id[split.idx["train"]]
    xs = split.x("train")
    div = [torch.as_tensor(diversity_target(counts[det], cid, args.div_norm)) for det in DETS]
    photons = [torch.as_tensor(counts[det].reshape(len(cid), -1).sum(1, dtype=np.float64), dtype=torch.float32)
               for det in DETS]
    tensors = (xs["neutron"], xs["proton"], split.cond("train"), *div, *photons)
    c_va, true_va = split.cond("val")[:1000], {det: v[:1000] for det, v in split.counts("val").items()}
    nets = tuple(m.to(dev) for m in build_networks(vars(args)).values())
    gen, disc = nets
    opts = tuple(torch.optim.Adam(m.parameters(), lr=lr, betas=tuple(args.betas)) for m, lr in zip(nets, (args.lr, args.d_lr)))
    steps_per_epoch = max(len(cid) // args.batch_size, 1)   # the last incomplete batch is dropped (BatchNorm)
    planned = args.epochs * steps_per_epoch
    total = min(planned, args.max_steps or planned)
    noise = torch.Generator(dev).manual_seed(args.seed)
    step, epoch, best = 0, 0, None                       # best: the best-by-validation generator (data.track_best)
    if ck is not None:
        for m, k in zip(nets + opts, ("weights", "disc", "opt_g", "opt_d")):
            m.load_state_dict(ck[k])
        noise.set_state(ck["rng"]["noise"]), torch.set_rng_state(ck["rng"]["torch"])
        step, epoch, best = ck["step"], ck["epoch"], ck.get("best")
        print(f"resumed from {ckpt_path} at step {step} (epoch {epoch})")
    nets_t = tuple(data.wrap_ddp(m, dist) for m in nets)   # training step: this rank's shard of each global batch, DDP
    n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in nets)
    print(f"{NAME}: G {n_g:,} + D {n_d:,} parameters, {len(cid):,} training particles (both responses), "
          f"{steps_per_epoch} steps per epoch, {total} steps in total, device {dev}")
    if args.amp:
        print("note: --amp is used for sampling only; GAN training runs in float32")

    def save():
        data.save_checkpoint(dict(model=NAME, args=vars(args), data=split.state(), weights=gen.state_dict(),
                                  disc=disc.state_dict(), opt_g=opts[0].state_dict(), opt_d=opts[1].state_dict(),
                                  step=step, epoch=epoch, n_params=n_g, best=best,
                                  rng=dict(noise=noise.get_state(), torch=torch.get_rng_state())), ckpt_path)

    def validate(logs):
        nonlocal best
        gen.eval()
        gen_counts = sample(gen, c_va.to(dev), torch.Generator().manual_seed(0))
        gen.train()
        val_w = {f"val_W_{det}": metrics.wasserstein(true_va[det], gen_counts[det])[0] for det in DETS}
        score = sum(math.log(max(w, 1e-9)) for w in val_w.values())    # geometric mean: both detectors count
        best = data.track_best(best, step, score, gen, **val_w)
        m = {k: float(np.mean([r[k] for r in logs])) for k in logs[0]} if logs else {}
        row = dict(step=step, epoch=step / steps_per_epoch, train_loss=m.get("g_loss"), **m, **val_w,
                   minutes=(time.time() - t_start) / 60)
        data.log_jsonl(out / "metrics.jsonl", **row)
        if logs:
            extra = "".join(f"  {k} {m[k]:.3g}" for k in m if k.startswith(("div_", "d_img_")))
            print(f"step {step:6d}  epoch {row['epoch']:.2f}  D loss {m['d_loss']:.3f}  G loss {m['g_loss']:.3f}  "
                  f"D(real) {m['d_real']:.3f}  D(fake) {m['d_fake']:.3f}{extra}  val W ZN {val_w['val_W_neutron']:.3f}"
                  f"  ZP {val_w['val_W_proton']:.3f}  {row['minutes']:.1f} min")

    t_start = time.time()
    for m in nets:
        m.train()
    while step < total:
        order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)   # batch order of this epoch
        skip = step - epoch * steps_per_epoch                                # batches already done (resume)
        bar = tqdm(data.batches(tensors, args.batch_size, order, start=skip), total=steps_per_epoch, initial=skip,
                   desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.smoke or not dist.is_main)
        logs = []
        for i, batch in enumerate(bar, start=skip):
            if i >= steps_per_epoch:
                break
            log = train_step(nets_t, opts, [t.to(dev) for t in batch], noise, args)   # DDP = 1 process (not dropout)
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
    if best is not None:
        print(f"best validation at step {best['step']}: val W ZN {best['val_W_neutron']:.3f}, ZP "
              f"{best['val_W_proton']:.3f} (--sample/--eval/--export use it; --weights last for step {step})")
    print(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min, checkpoint {ckpt_path}")
    data.dist_close(dist)
    return ckpt_path


def load_model(args):
    ck = data.load_checkpoint(args.ckpt or Path(args.out) / "ckpt.pt", NAME, "joint")
    dev = data.pick_device(args.device)
    gen = build_model(ck["args"]).to(dev)
    weights, ck["weights_used"] = data.pick_weights(ck, args.weights)
    gen.load_state_dict(weights)
    print(f"{NAME}: generator weights: {ck['weights_used']}")
    return ck, gen.eval(), dev


def sample_cmd(args):
    ck, gen, dev = load_model(args)
    particles = data.sampling_conditions(ck, args.n, args.particles)
    cond = data.standardize(particles, ck["data"]["mean"], ck["data"]["std"])
    g = torch.Generator().manual_seed(args.seed)
    parts = [sample(gen, c.to(dev), g) for c in torch.split(cond, 1024)]
    out = Path(args.out if args.out.endswith(".npz") else Path(args.out) / "samples.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, particles=particles, **{f"responses_{det}": torch.cat([p[det] for p in parts]).cpu().numpy()
                                          for det in DETS})
    print(f"wrote {len(particles)} particles' responses (ZN 44x44, ZP 56x30) to {out}")


def joint_floor(split, reps, max_test):
    """The noise floor per detector: the test particles re-simulated jointly (redrawn while neither response
    passes its cut, as the joint set was selected), each detector scored against its test responses."""
    if not split.ds.is_toy:
        return {det: None for det in DETS}
    idx = split.idx["test"][:max_test]
    cond = data.standardize(split.ds.features[idx], split.mean, split.std)
    scores = {det: [] for det in DETS}
    for r in range(reps):
        sim, below = data.resimulate(split.ds.particles[idx], "joint", 10_000 + r, split.ds.cut)
        for det in DETS:
            scores[det].append(dict(metrics.score(split.ds.images[det][idx], sim[det], split.ds.cond_id[idx],
                                                  split.ds.particles[idx, 9], cond.numpy(), seed=r), below_cut=below))
    return {det: metrics.summarize(s) for det, s in scores.items()}


def separate_rows(args, split, idx):
    """--compare-ckpt: each separate model's row on the joint test particles, sampled by its own script's --sample
    (seeds seed, seed+1, ... as metrics.evaluate), and the fraction of these particles it saw in training."""
    rows = {det: {} for det in DETS}
    cond = data.standardize(split.ds.features[idx], split.mean, split.std).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "particles.npz", particles=split.ds.particles[idx])
        for path in args.compare_ckpt:
            try:
                ck = torch.load(path, map_location="cpu", weights_only=True)
                model, det = ck["model"], ck["data"]["detector"]
            except Exception as e:
                raise data.DataError(f"--compare-ckpt {path}: not a readable checkpoint of this project ({e})") from None
            script = Path(__file__).with_name(f"{model}.py")
            if det not in DETS or not script.exists():
                raise data.DataError(f"--compare-ckpt {path}: a {model}.py checkpoint of detector {det}: need a "
                                     "single-detector model (gan.py for ZN, sdigan_proton.py for ZP)")
            sep = data.split_from_checkpoint(ck, progress=False)
            known = {r.tobytes() for r in np.unique(sep.ds.features[sep.idx["train"]], axis=0)}
            seen = float(np.mean([p.tobytes() in known for p in split.ds.features[idx]]))
            reps = []
            for r in range(args.reps):
                out = Path(tmp) / f"{model}_{r}.npz"
                cmd = [sys.executable, str(script), "--sample", "--ckpt", str(path), "--particles", str(Path(tmp) / "particles.npz"),
                       "--n", str(len(idx)), "--seed", str(args.seed + r), "--out", str(out), "--device", args.device]
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode:
                    raise data.DataError(f"--compare-ckpt {path}: {' '.join(cmd)} failed: {run.stderr[-500:]}")
                reps.append(metrics.score(split.ds.images[det][idx], np.load(out)["responses"], split.ds.cond_id[idx],
                                          split.ds.particles[idx, 9], cond, seed=r))
            rows[det][f"{model} (separate)"] = dict(metrics.summarize(reps), seen_in_training=[seen, 0.0],
                                                    ckpt=str(path), n_params=ck.get("n_params"))
            print(f"{model}.py ({det}): {100 * seen:.1f} % of the joint test particles are in its training split")
    return rows


def export_cmd(args):
    ck, gen, dev = load_model(args)
    data.export_onnx(Sampler(gen), ck, args.export, NAME)


def evaluate(args):
    ck, gen, dev = load_model(args)
    split = data.split_from_checkpoint(ck)
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("eval.json")
    max_test = args.max_test or None
    idx = split.idx["test"][:max_test]
    separate = separate_rows(args, split, idx) if args.compare_ckpt else {}
    floors = joint_floor(split, args.reps, max_test)
    ms = metrics.time_per_sample(generator_fn(gen, dev, None, args.amp), split.cond("test")[:256])
    results = {}
    for det in DETS:
        view = split.views[det]
        row = metrics.evaluate(generator_fn(gen, dev, det, args.amp), view, args.reps, args.seed, max_test, keep=args.plot)
        if args.plot:
            row, kept = row
            png, true = path.with_name(f"eval_{det}.png"), split.ds.images[det][idx]
            metrics.plot_grid(true, kept, png.with_suffix(".grid.png"), 8, title=f"{NAME} {det}: test vs generated")
            metrics.plot_histograms(true, kept, png.with_suffix(".hist.png"), title=f"{NAME} {det}: channel sums")
            metrics.plot_features(true, kept, png.with_suffix(".features.png"), title=f"{NAME} {det}: shower features")
        fl, lk = floors[det], metrics.lookup(view, args.reps, max_test)
        sep = separate.get(det, {})
        print(f"\n{det} detector (joint set), split '{split.mode}', {len(idx)} test events, {args.reps} repetitions")
        print(metrics.table({f"{NAME} ({det})": row, **{k: v for k, v in sep.items()}, "floor (joint re-sim)": fl,
                             "lookup (nearest train)": lk}, fl))
        results[det] = dict(name=f"{NAME} ({det} part)", weights=ck["weights_used"], model=row, floor=fl, lookup=lk, separate=sep,
                            W_over_floor=row["W"][0] / fl["W"][0] if fl else None, detector=det, data=split.ds.source,
                            split=split.mode, n_test=len(idx), reps=args.reps, n_shower=min(len(idx), metrics.SHOWER_N),
                            command=" ".join(sys.argv), n_params=ck["n_params"], train_steps=ck["step"],
                            ms_per_particle=ms, threads=torch.get_num_threads())
        path.with_name(f"eval_{det}.json").write_text(json.dumps(results[det], indent=1))
    path.write_text(json.dumps(results, indent=1))
    if args.plot:                                                    # validation W of both parts against steps
        metrics.plot_run_curve(path, NAME)
    print(f"\n{ms:.4f} ms per particle (both responses, batch 256, {dev}, {torch.get_num_threads()} threads)\n"
          f"written {path} and eval_neutron.json / eval_proton.json beside it")
    return results


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
