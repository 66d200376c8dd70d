"""One SDI-GAN that simulates both ALICE Zero Degree Calorimeters at once: ZN (44 x 44) and ZP (56 x 30).

Poster: Kita, Rogozinski, Dubinski, Deja, Bedkowski, Wenzel, Rokita, Trzcinski, ML in PL 2023: an SDI-GAN
with two generator outputs and a two-image, two-logit discriminator, trained on both responses of a particle.
Table 1 (W / time): joint ZP part 6.69 / 0.20 s, ZN 8.76 / 7.37 s; separate 8.91 / 8.91 s, 9.01 / 10.63 s.
Open settings: the authors' two-output code; SDI and intensity terms: arXiv 2406.03263 eqs. 3-4, per detector.

Method. G(z, c), z ~ N(0, I_8): a shared trunk, one head per detector -> log1p ZN and ZP images. D: one conv
branch per image, shared dense layers with c, two logits. Fakes take a shuffled copy c' of the batch's
conditions; what they are compared with comes from the real event that c' came from. One D, then one G step:
    L_D = BCE(D(x, c), 1) + BCE(D(G(z1, c'), c'), 0)            (both logits: both images of each particle)
    L_G = BCE(D(G(z1, c'), c'), 1) + sum over ZN, ZP of (l_div L_div + l_in L_in)
    L_div = mean f_div(c') / (d_I / d_z + 1e-5),  d_I = |G(z1, c') - G(z2, c')|_1,  d_z = |z1 - z2|_1  (eq. 3)
    L_in = mean |photon sum of expm1 G(z1, c') - photon sum of the real response|                    (eq. 4)
l_div 0.1, l_in 1e-10; the best generator by validation is kept beside the last (--weights). CPU default:
widths 8, no dropout or BatchNorm in D, Adam 2e-4 (.5, .9), 600 steps, 150,000 events. --paper: widths 128 /
32, dropout 0.2, Adam 1e-4, 200 epochs, no L_in (l_in 0, as the code), f_div min-max scaled (div_norm=minmax).

Usage:
    python sdigan_joint.py --train                          # CPU default: 600 steps, ~5 min on 2 cores
    python sdigan_joint.py --train --split disjoint --out runs/sdigan_joint_disjoint
    python sdigan_joint.py --train --paper                  # the authors' setting (200 epochs: a GPU job)
    python sdigan_joint.py --eval --ckpt runs/sdigan_joint/ckpt.pt --compare-ckpt GAN_CKPT SDIGAN_PROTON_CKPT
    python sdigan_joint.py --sample --ckpt runs/sdigan_joint/ckpt.pt --n 1000 --out samples.npz   # ZN and ZP
    python sdigan_joint.py --export joint.onnx --ckpt runs/sdigan_joint/ckpt.pt     # the sampler as ONNX

Every setting beside its source, and the deviations from the poster: docs/fidelity/sdigan_joint.md.
Runs, what --eval writes, what each logged number means, and their history: docs/models/sdigan_joint.md.
"""
import functools
import json
import math
import subprocess
import sys
import tempfile
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
NAME = "sdigan_joint"
DEFAULTS = dict(detector="joint", limit=150_000, epochs=1, max_steps=600, batch_size=128, lr=2e-4, d_lr=2e-4,
                betas=[0.5, 0.9], width=8, d_width=8, dropout=0.0, d_norm="none", lambda_div=0.1,
                lambda_int=1e-10, div_norm="dataset", val_every=100)
PAPER = dict(limit=None, epochs=200, max_steps=None, lr=1e-4, d_lr=1e-4, betas=[0.9, 0.999], width=128,
             d_width=32, dropout=0.2, d_norm="batch", div_norm="minmax", lambda_int=0.0)   # the code: no L_in
SMOKE = dict(limit=2000, width=4, d_width=4, max_steps=6, batch_size=32, max_test=200, reps=2, ckpt_every=3)
PUBLISHED = {}   # neither the poster nor its code's comments state a parameter count
DEVIATIONS = ("SDI term per detector on the generated images, the proton paper's eq. 3 (the code: d_I on D's "
              "features)",
              "SDI pair in one G pass sharing BatchNorm and dropout masks (the code: two passes)",
              "D and G updated one after the other (the code: together, from one forward pass)",
              "the best-by-validation generator is kept (the code: the last)",
              "PyTorch's initialisation, BatchNorm momentum 0.1 / eps 1e-5, Adam eps 1e-8 (Keras: Glorot, "
              "0.01 / 1e-3, 1e-7)")
DETS = data.JOINT                               # ("neutron", "proton"): head, D branch and logit order
NOISE = 8                                       # latent size (the authors' two-output code: latent_dim = 8)


# ----------------------------------------------------------------------------------------------------------
# The default network: a two-headed generator, a two-branch discriminator (the authors' code, any width)
# ----------------------------------------------------------------------------------------------------------
class PairDropout(nn.Dropout):
    """nn.Dropout that, while `paired` is set, draws one mask for the first half of the batch and reuses it
    for the second half: the two SDI images G(z1, c), G(z2, c) of a pair then differ by their noise only."""
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
                         nn.Conv2d(2 * w, w, k2), *act(w, dropout), nn.Conv2d(w, w // 2, k3),
                         *act(w // 2, dropout), nn.Conv2d(w // 2, 1, (2, 1)))


class Generator(nn.Module):
    """(z, c) -> {detector: log1p image (n, 1, H, W)} from one shared trunk (dense 256, dense to (w, 20, 12),
    upsample (3, 2)) and one head per detector of "valid" convs, ReLU: exactly 44 x 44 and 56 x 30."""

    def __init__(self, width, dropout, n_cond=9):
        super().__init__()
        w = self.w = width
        self.trunk = nn.Sequential(nn.Linear(NOISE + n_cond, 256), *act(256, dropout, 1),
                                   nn.Linear(256, w * 20 * 12), *act(w * 20 * 12, dropout, 1))
        self.up = nn.Upsample(scale_factor=(3, 2))                                   # 20 x 12 -> 60 x 24
        self.heads = nn.ModuleDict(dict(neutron=head(w, [(6, 2)] * 3, dropout),     # 55x23 55x46 50x45 45x44
                                        proton=head(w, [(2, 6), (2, 6), (2, 4)], dropout)))  # 59x19 .. 57x30

    def forward(self, z, cond, paired=False):
        """paired=True: the batch is two halves of SDI pairs, sharing their dropout masks (PairDropout)."""
        for m in self.modules():
            if isinstance(m, PairDropout):
                m.paired = paired
        h = self.up(self.trunk(torch.cat([z, cond], 1)).view(-1, self.w, 20, 12))
        return {det: F.relu(self.heads[det](h)) for det in DETS}


class Discriminator(nn.Module):
    """Two logits of "real" (ZN, ZP) for a pair of log1p images and their standardised condition: per image
    3x3 convs d, d/2 with max pooling, both flattened and concatenated with c, dense 128 -> 64 -> 2."""

    def __init__(self, width, dropout, norm=True, n_cond=9):
        super().__init__()
        d = width
        self.branches = nn.ModuleDict({det: nn.Sequential(
            nn.Conv2d(1, d, 3), *act(d, dropout, 2, norm), nn.MaxPool2d(2),
            nn.Conv2d(d, d // 2, 3), *act(d // 2, dropout, 2, norm), nn.MaxPool2d((2, 1)), nn.Flatten())
            for det in DETS})
        flat = d // 2 * (9 * 19 + 12 * 12)         # ZN 44x44 -> 9 x 19, ZP 56x30 -> 12 x 12 after the branch
        self.feat = nn.Sequential(nn.Linear(flat + n_cond, 128), *act(128, dropout, 1, norm),
                                  nn.Linear(128, 64), *act(64, dropout, 1, norm))   # the SDI feature layer
        self.out = nn.Linear(64, len(DETS))

    def forward(self, x, cond):
        return self.out(self.feat(torch.cat([self.branches[det](x[det]) for det in DETS] + [cond], 1)))


def build_model(cfg):
    """The generator described by a run's settings (the network that samples)."""
    return Generator(cfg["width"], cfg["dropout"])


def build_networks(cfg):
    """Every trained network of a run's settings (or a checkpoint's), by name."""
    return dict(generator=build_model(cfg),
                discriminator=Discriminator(cfg["d_width"], cfg["dropout"], cfg["d_norm"] == "batch"))


# ----------------------------------------------------------------------------------------------------------
# The method: the adversarial loss, the SDI and intensity terms per detector, the sampler
# ----------------------------------------------------------------------------------------------------------
def adversarial_loss(logit, real):
    """Binary cross-entropy of D's logits (both detectors') against 1 (real=True) or 0; G's non-saturating
    loss is its fakes' logits against 1."""
    return F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, float(real)))


def sdi_term(x1, x2, z1, z2, div):
    """Eq. 3: mean over the batch of f_div * (d_I / d_z)^-1, d_I = L1 distance (sum over pixels) between the
    two generated images of one detector, d_z = L1 distance between the codes; 1e-5 bounds it for equal
    images."""
    d_img = (x1 - x2).abs().flatten(1).sum(1)
    return (div / (d_img / (z1 - z2).abs().sum(1) + 1e-5)).mean(), d_img


def intensity_term(fake, photons):
    """Eq. 4, as a batch mean: |raw photon sum of the generated image - photon sum of the real response|."""
    return (torch.expm1(fake.clamp(max=12)).flatten(1).sum(1) - photons).abs().mean()


def diversity_target(counts, cond_id, norm="dataset"):
    """Per event, the paper's f_div (eq. 3): the sum over pixels of the per-pixel population std of the raw
    counts of all responses with the same condition id, divided by the number of responses given
    (norm="dataset", Sec. 3.2) or min-max scaled over the conditions (norm="minmax", the authors' code)."""
    counts, cond_id = np.asarray(counts), np.asarray(cond_id)
    order = np.argsort(cond_id, kind="stable")
    uniq, start, cnt = np.unique(cond_id[order], return_index=True, return_counts=True)
    div = np.array([counts[order[s:s + n]].reshape(n, -1).astype(np.float64).std(0).sum()
                    for s, n in zip(start, cnt)])
    if norm == "dataset":
        div = div / len(counts)
    else:
        span = div.max() - div.min()
        div = (div - div.min()) / span if span > 0 else np.zeros_like(div)
    return div[np.searchsorted(uniq, cond_id)].astype(np.float32)


class Sampler(data.Sampler):
    """The sampler as one module (bench.py, --export): (ZN counts, ZP counts) from cond (n, 9) and z (n,
    NOISE): two outputs, counts_neutron (n, 44, 44) and counts_proton (n, 56, 30)."""
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
    """{detector: raw photon counts (n, H, W)} for standardised conditions `cond` (n, 9): both responses of
    each particle from one noise vector. Noise is drawn on the CPU from `generator` (a seed gives the same
    samples anywhere)."""
    return dict(zip(DETS, Sampler(gen).run(cond, generator)))


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def train(args):
    run = data.Run(args, NAME)                  # resume, data, checkpoints, logging, DDP: data.py Part II
    args, split, dev = run.args, run.split, run.device
    counts = split.counts("train")              # {detector: raw counts}; the regularisers' targets per event
    cid = split.ds.cond_id[split.idx["train"]]
    xs = split.x("train")
    div = [torch.as_tensor(diversity_target(counts[det], cid, args.div_norm)) for det in DETS]
    photons = [torch.as_tensor(counts[det].reshape(len(cid), -1).sum(1, dtype=np.float64),
                               dtype=torch.float32) for det in DETS]
    tensors = (xs["neutron"], xs["proton"], split.cond("train"), *div, *photons)
    c_va = split.cond("val")[:1000]
    true_va = {det: v[:1000] for det, v in split.counts("val").items()}
    gen, disc = (m.to(dev) for m in build_networks(vars(args)).values())
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=tuple(args.betas))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.d_lr, betas=tuple(args.betas))
    n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (gen, disc))
    run.plan(len(cid), args.batch_size, n_g, drop_last=True,             # drop_last: BatchNorm; constant LRs
             about=f"G {n_g:,} + D {n_d:,} parameters (training particles: both responses)")
    noise = torch.Generator(dev).manual_seed(args.seed)
    run.extra["best"] = None                    # the best-by-validation generator (data.track_best)
    run.keep(weights=gen, disc=disc, opt_g=opt_g, opt_d=opt_d, noise=noise)
    G, D = (run.wrap(m) for m in (gen, disc))   # torchrun: DDP, and still one process's losses
    if args.amp:
        data.log("note: --amp is used for sampling only; GAN training runs in float32")

    def validate():                             # the generator in eval mode on 1000 validation conditions
        gen.eval()
        fake = sample(gen, c_va.to(dev), torch.Generator().manual_seed(0))
        gen.train()
        val_w = {f"val_W_{det}": metrics.wasserstein(true_va[det], fake[det])[0] for det in DETS}
        score = sum(math.log(max(w, 1e-9)) for w in val_w.values())    # geometric mean: both detectors count
        run.extra["best"] = data.track_best(run.extra["best"], run.step, score, gen, **val_w)
        return val_w
    run.validate = validate

    for xn, xp, c, div_n, div_p, ph_n, ph_p in run.batches(tensors):
        x = dict(neutron=xn, proton=xp)
        perm = torch.randperm(len(c), generator=noise, device=noise.device).to(dev)
        fc = c[perm]                            # the fakes' conditions, and their events' targets:
        div = dict(neutron=div_n[perm], proton=div_p[perm])
        photons = dict(neutron=ph_n[perm], proton=ph_p[perm])
        z1 = data.noise((len(c), NOISE), noise, dev)
        if args.lambda_div > 0:                 # both SDI images in one pass: shared BatchNorm, dropout masks
            z2 = data.noise((len(c), NOISE), noise, dev)
            both = G(torch.cat([z1, z2]), torch.cat([fc, fc]), paired=True)
            fake = {det: v.chunk(2)[0] for det, v in both.items()}
            fake2 = {det: v.chunk(2)[1] for det, v in both.items()}
        else:
            fake = G(z1, fc)
        real_logit = D(x, c)
        fake_logit = D({det: v.detach() for det, v in fake.items()}, fc)
        d_loss = adversarial_loss(real_logit, True) + adversarial_loss(fake_logit, False)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = adversarial_loss(D(fake, fc), True)                     # non-saturating, both logits
        logged = dict(d_loss=d_loss, d_real=torch.sigmoid(real_logit).mean(),
                      d_fake=torch.sigmoid(fake_logit).mean())
        total = g_loss
        for det in DETS:
            if args.lambda_div > 0:
                logged[f"div_{det}"], d_img = sdi_term(fake[det], fake2[det], z1, z2, div[det])
                logged[f"d_img_{det}"] = d_img.mean()
                total = total + args.lambda_div * logged[f"div_{det}"]
            if args.lambda_int > 0:
                logged[f"int_{det}"] = intensity_term(fake[det], photons[det])
                total = total + args.lambda_int * logged[f"int_{det}"]
        opt_g.zero_grad(set_to_none=True)
        total.backward()
        opt_g.step()
        run.step_done(train_loss=g_loss, g_loss=g_loss, **logged)
    best = run.extra["best"]
    if best is not None:
        data.log(f"best validation at step {best['step']}: val W ZN {best['val_W_neutron']:.3f}, ZP "
                 f"{best['val_W_proton']:.3f} (--sample/--eval/--export use it; --weights last for step "
                 f"{run.step})")
    return run.finish()


# ==========================================================================================================
# Appendix B. The command line
# ==========================================================================================================
def get_args(argv=None):
    p = data.parser(__doc__, NAME, detectors=["joint"])
    g = p.add_argument_group("joint SDI-GAN")
    g.add_argument("--weights", choices=["best", "last"], default="best", help="--sample/--eval/--export: "
                   "the generator of the best validation score (geometric mean of val W ZN, ZP) or the last")
    g.add_argument("--compare-ckpt", nargs="+", default=[], metavar="CKPT", help="--eval: also score these "
                   "separate models (gan.py ZN, sdigan_proton.py ZP checkpoints) on the joint test events")
    args = data.parse(p, argv, DEFAULTS, PAPER, SMOKE)
    betas = args.betas
    widths = (args.width, args.d_width)
    lambdas = (args.lambda_div, args.lambda_int)
    for bad, msg in [(args.d_lr <= 0, f"d_lr must be positive (got {args.d_lr})"),
                     (len(betas) != 2 or not all(0 <= b < 1 for b in betas), "betas takes b1,b2 in [0, 1)"),
                     (min(lambdas) < 0, f"the lambda_* weights must be >= 0 {lambdas}"),
                     (not 0 <= args.dropout < 1, f"dropout must be in [0, 1) (got {args.dropout})"),
                     (any(w < 2 or w % 2 for w in widths), f"widths must be even and >= 2 {widths}"),
                     (args.div_norm not in ("dataset", "minmax"), "div_norm is dataset or minmax"),
                     (args.d_norm not in ("batch", "none"), "d_norm is batch or none")]:
        if bad:
            p.error(msg)
    return args


def load_sampler(ck, args, device):
    """The Sampler of a checkpoint's generator: its best-by-validation weights unless --weights last."""
    gen = build_model(ck["args"]).to(device)
    weights, ck["weights_used"] = data.pick_weights(ck, args.weights)
    gen.load_state_dict(weights)
    data.log(f"{NAME}: generator weights: {ck['weights_used']}")
    return Sampler(gen)


def write_samples(args, ck, sampler, device):
    """--sample (data.main calls it in place of its one-response file): both responses of the first --n test particles (or of --particles), seeded by --seed, in one
    file with responses_neutron, responses_proton and particles (data.load_joint reads it)."""
    particles = data.sampling_conditions(ck, args.n, args.particles)
    cond = data.standardize(particles, ck["data"]["mean"], ck["data"]["std"])
    g = torch.Generator().manual_seed(args.seed)
    parts = [sample(sampler.gen, c.to(device), g) for c in torch.split(cond, 1024)]
    out = Path(args.out if args.out.endswith(".npz") else Path(args.out) / "samples.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, particles=particles, **{f"responses_{det}": torch.cat([p[det] for p in parts]).cpu().numpy()
                                          for det in DETS})
    print(f"wrote {len(particles)} particles' responses (ZN 44x44, ZP 56x30) to {out}")


def part_generator(sampler, device, det=None, amp=False):
    """The (cond, generator) -> counts callable that metrics.evaluate expects: one detector's responses, or
    (det=None) both, flattened and concatenated per particle (what the timing measures)."""
    def generate(cond, g):
        with data.autocast(device, amp):
            out = dict(zip(DETS, sampler.run(cond.to(device), g)))
        return out[det].float() if det else torch.cat([out[d].flatten(1) for d in DETS], 1).float()
    return generate


def joint_floor(split, det):
    """metrics.run_eval's floor_fn for detector det's view of the joint split: metrics.floor with the test particles
    re-simulated jointly (redrawn while neither response passes its cut, as the joint set was selected), this
    detector's responses scored against its test responses. None for real data."""
    def simulate(particles, seed):
        sim, below = data.resimulate(particles, "joint", seed, split.ds.cut)
        return sim[det], below
    return functools.partial(metrics.floor, simulate=simulate) if split.ds.is_toy else lambda *a, **k: None


def separate_rows(args, split, idx):
    """--compare-ckpt: each separate model's (label, row, record) on the joint test particles, sampled by its own
    script's --sample (seeds seed, seed+1, ... as metrics.evaluate), with the fraction of these particles it saw
    in training; keyed by detector and script name (metrics.run_eval's `others`)."""
    rows = {det: {} for det in DETS}
    cond = data.standardize(split.ds.features[idx], split.mean, split.std).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        particles = Path(tmp) / "particles.npz"
        np.savez(particles, particles=split.ds.particles[idx])
        for path in args.compare_ckpt:
            try:
                ck = torch.load(path, map_location="cpu", weights_only=True)
                model, det = ck["model"], ck["data"]["detector"]
            except Exception as e:
                raise data.DataError(f"--compare-ckpt {path}: not a readable checkpoint of this project "
                                     f"({e})") from None
            script = Path(__file__).with_name(f"{model}.py")
            if det not in DETS or not script.exists():
                raise data.DataError(f"--compare-ckpt {path}: a {model}.py checkpoint of detector {det}: "
                                     "need a single-detector model (gan.py for ZN, sdigan_proton.py for ZP)")
            if model in rows[det]:
                raise data.DataError(f"--compare-ckpt: two {model}.py checkpoints; give one per script")
            sep = data.split_from_checkpoint(ck, progress=False)
            known = {r.tobytes() for r in np.unique(sep.ds.features[sep.idx["train"]], axis=0)}
            seen = float(np.mean([p.tobytes() in known for p in split.ds.features[idx]]))
            reps, recs = [], []
            for r in range(args.reps):
                out = Path(tmp) / f"{model}_{r}.npz"
                cmd = [sys.executable, str(script), "--sample", "--ckpt", str(path), "--particles",
                       str(particles), "--n", str(len(idx)), "--seed", str(args.seed + r), "--out", str(out),
                       "--device", args.device]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise data.DataError(f"--compare-ckpt {path}: {' '.join(cmd)} failed: "
                                         f"{done.stderr[-500:]}")
                recs.append({})
                reps.append(metrics.score(split.ds.images[det][idx], np.load(out)["responses"],
                                          split.ds.cond_id[idx], split.ds.particles[idx, 9], cond, seed=r,
                                          record=recs[-1], channels=args.channels))
            record = dict(seeds=[args.seed + r for r in range(args.reps)])
            metrics._collect(record, recs)
            row = dict(metrics.summarize(reps), seen_in_training=[seen, 0.0], ckpt=str(path),
                       n_params=ck.get("n_params"))
            rows[det][model] = (f"{model} (separate)", row, record)
            print(f"{model}.py ({det}): {100 * seen:.1f} % of the joint test particles are in its training "
                  "split")
    return rows


def evaluate(args, ck, sampler, device):
    """--eval: per detector metrics.run_eval on the joint test events (the model, the joint floor, the lookup,
    and the --compare-ckpt models on the same particles, all in one paired bootstrap), written as
    eval_<detector>.json with its sums, and eval.json holding both."""
    split = data.split_from_checkpoint(ck)
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("eval.json")
    idx = split.idx["test"][:args.max_test or None]
    separate = separate_rows(args, split, idx) if args.compare_ckpt else {}
    ms = metrics.time_per_sample(part_generator(sampler, device, None, args.amp), split.cond("test")[:256])
    results = {}
    for det in DETS:
        view = split.views[det]
        print(f"\n{det} detector (joint set):")
        results[det] = metrics.run_eval(
            part_generator(sampler, device, det, args.amp), view, path.with_name(f"eval_{det}.json"), args,
            f"{NAME} ({det} part)", floor_fn=joint_floor(split, det), others=separate.get(det),
            extra=dict(weights=ck["weights_used"], n_params=ck["n_params"], train_steps=ck["step"],
                       ms_per_particle=ms, threads=torch.get_num_threads()))
    path.write_text(json.dumps(results, indent=1))
    print(f"\n{ms:.4f} ms per particle (both responses, batch 256, {device}, {torch.get_num_threads()} "
          "threads)\n"
          f"written {path} (both) beside eval_neutron.json / eval_proton.json and their .sums.npz")
    return results


if __name__ == "__main__":
    data.main(sys.modules[__name__])
