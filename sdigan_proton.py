"""SDI-GAN for the ALICE proton Zero Degree Calorimeter (ZP, 56 x 30 fibres), with the paper's ablation.

Paper: Bedkowski, Dubinski, Deja, Rokita 2024, proton ZDC SDI-GAN (arXiv 2406.03263), building on SDI-GAN
(Dubinski et al., ICONIP 2023). Real ZP set, Table 1 (Wasserstein): GAN 2.48, SDI-GAN 2.36, + intensity 2.29,
+ auxiliary regressor 2.08. Settings the paper leaves open: the authors' code (sin-gan-proton-aux-reg-1.py).

Method. A conditional DCGAN: G(z, c), z ~ N(0, I_10), c the 9 standardised features -> log1p counts (ReLU);
D(x, c) -> logit; a regressor A(x) -> rc(x), the (row, col) of x's brightest pixel. Fakes take a shuffled copy
c' of the batch's conditions; what they are compared with comes from the real event that c' came from (x'):
    L_D = BCE(D(x, c), 1) + BCE(D(G(z1, c'), c'), 0),   L_A = |A(x) - rc(x)|^2 on real images     (eqs. 1, 2)
    L_G = BCE(D(G(z1, c'), c'), 1) + l_div L_div + l_in L_in + l_aux L_aux                          (eq. 5)
    L_div = mean f_div(c') / (d_I / d_z + 1e-5),  d_I = |G(z1, c') - G(z2, c')|_1,  d_z = |z1 - z2|_1  (eq. 3)
    L_in = mean |photon sum of expm1 G(z1, c') - photon sum of x'|,  L_aux = |A(G(z1, c')) - rc(x')|^2  (4, 2)
f_div(c): the summed pixel std of the training responses of condition c over their number (div_norm=dataset)
or min-max scaled to [0, 1] (minmax: --paper, the code). --paper's L_in is the code's (int_form=code): mean
(photon sum of x' - sum of G's log1p outputs over the batch)^2. --variant: gan | sdi | sdi-int | sdi-int-aux.
l_div 0.1, l_in 1e-10, l_aux 1e-3. CPU default: widths 8, no dropout or BatchNorm in D, Adam 2e-4 (.5, .9),
1000 steps. --paper: widths 128/32/32, dropout 0.2, 350 epochs. One D, A and G step per batch.
Usage:
    python sdigan_proton.py --train                          # ZP, sdi-int-aux: 1000 steps, ~5 min on 2 cores
    python sdigan_proton.py --train --variant gan --out runs/sdigan_gan     # ablation rows: gan|sdi|sdi-int
    python sdigan_proton.py --train --paper                  # the paper's setting (350 epochs: a GPU job)
    python sdigan_proton.py --eval --ckpt runs/sdigan_proton/ckpt.pt --max-test 2000 --plot
    python sdigan_proton.py --sample --ckpt runs/sdigan_proton/ckpt.pt --n 1000 --out samples.npz
    python sdigan_proton.py --export zp.onnx --ckpt runs/sdigan_proton/ckpt.pt       # the sampler as ONNX

Every setting beside its source, and the deviations from the paper: docs/fidelity/sdigan_proton.md.
Runs, the ablation, what each logged number means, and their history: docs/models/sdigan_proton.md.
"""
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
NAME = "sdigan_proton"
DEFAULTS = dict(detector="proton", epochs=1, max_steps=1000, batch_size=128, lr=2e-4, d_lr=2e-4, aux_lr=1e-4,
                betas=[0.5, 0.9], width=8, d_width=8, aux_width=8, dropout=0.0, d_norm="none", lambda_div=0.1,
                lambda_int=1e-10, lambda_aux=1e-3, div_norm="dataset", int_form="eq4", val_every=500,
                train_seed=-1)                  # >= 0: seeds initialisation and noise (--seed: also the data)
PAPER = dict(epochs=350, max_steps=None, lr=1e-4, d_lr=1e-5, betas=[0.9, 0.999], width=128, d_width=32,
             aux_width=32, dropout=0.2, d_norm="batch", div_norm="minmax", int_form="code",
             max_test=0, channels="odd")       # eval: the code's whole 20 % test split, ch1-4 on odd pixels
SMOKE = dict(limit=1500, width=4, d_width=4, aux_width=2, max_steps=6, batch_size=32, max_test=200, reps=2,
             ckpt_every=3)
PUBLISHED = {}   # the paper states no parameter counts (its Fig. 1 draws the generator without them)
DEVIATIONS = ("intensity term in the code's form (MSE, event sums vs the batch's log1p total): eq. 4 at "
              "1e-10 is inert",
              "SDI pair in one G pass sharing BatchNorm and dropout masks (the code: two passes)",
              "D, regressor and G updated one after the other (the code: together, from one forward pass)",
              "regressor trained on real images (the code: on generated ones)",
              "PyTorch's initialisation, BatchNorm momentum 0.1 / eps 1e-5, Adam eps 1e-8 (Keras: Glorot, "
              "0.01 / 1e-3, 1e-7)")
NOISE = 10                                       # latent size k (the authors' code: NOISE_DIM = 10)
VARIANTS = {"gan": set(), "sdi": {"sdi"}, "sdi-int": {"sdi", "int"}, "sdi-int-aux": {"sdi", "int", "aux"}}


# ----------------------------------------------------------------------------------------------------------
# The default network: generator, discriminator, regressor (the authors' Keras networks, any width)
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


class Generator(nn.Module):
    """(z, c) -> log1p image (n, 1, 56, 30): dense 256, dense (w, 20, 10), upsample (3, 2), 2x2 conv 2w,
    upsample (1, 2), 2x2 convs w and w/2, a (2, 7) conv to one channel, ReLU ("valid" convs, as the code)."""

    def __init__(self, width, dropout, n_cond=9):
        super().__init__()
        w = self.w = width
        self.dense = nn.Sequential(nn.Linear(NOISE + n_cond, 256), *act(256, dropout, 1),
                                   nn.Linear(256, w * 20 * 10), *act(w * 20 * 10, dropout, 1))
        self.conv = nn.Sequential(nn.Upsample(scale_factor=(3, 2)), nn.Conv2d(w, 2 * w, 2),
                                  *act(2 * w, dropout),
                                  nn.Upsample(scale_factor=(1, 2)), nn.Conv2d(2 * w, w, 2), *act(w, dropout),
                                  nn.Conv2d(w, w // 2, 2), *act(w // 2, dropout),
                                  nn.Conv2d(w // 2, 1, (2, 7)))

    def forward(self, z, cond, paired=False):    # 20x10 -> 60x20 -> 59x19 -> 59x38 -> 58x37 -> 57x36 -> 56x30
        """paired=True: the batch is two halves of SDI pairs, sharing their dropout masks (PairDropout)."""
        for m in self.modules():
            if isinstance(m, PairDropout):
                m.paired = paired
        return F.relu(self.conv(self.dense(torch.cat([z, cond], 1)).view(-1, self.w, 20, 10)))


class Discriminator(nn.Module):
    """Logit of "real" for a log1p image and its standardised condition: 3x3 convs d, d/2 with max pooling,
    flatten, the condition concatenated, dense 128 -> 64 -> logit."""

    def __init__(self, width, dropout, norm=True, n_cond=9):
        super().__init__()
        d = width
        self.conv = nn.Sequential(nn.Conv2d(1, d, 3), *act(d, dropout, 2, norm), nn.MaxPool2d(2),   # 27 x 14
                                  nn.Conv2d(d, d // 2, 3), *act(d // 2, dropout, 2, norm),
                                  nn.MaxPool2d((2, 1)), nn.Flatten())                                # 12 x 12
        self.feat = nn.Sequential(nn.Linear(d // 2 * 12 * 12 + n_cond, 128), *act(128, dropout, 1, norm),
                                  nn.Linear(128, 64), *act(64, dropout, 1, norm))
        self.out = nn.Linear(64, 1)

    def forward(self, x, cond):
        return self.out(self.feat(torch.cat([self.conv(x), cond], 1)))[:, 0]


class Regressor(nn.Module):
    """(row, col) of the brightest pixel of a log1p image, in pixels: 3x3 convs a, 2a, 4a, 8a, dense 2."""

    def __init__(self, a, dropout):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, a, 3), *act(a, dropout), nn.MaxPool2d(2),              # 27 x 14
                                 nn.Conv2d(a, 2 * a, 3), *act(2 * a, dropout), nn.MaxPool2d((2, 1)), # 12 x 12
                                 nn.Conv2d(2 * a, 4 * a, 3), *act(4 * a, dropout),
                                 nn.MaxPool2d((2, 1)),                                                # 5 x 10
                                 nn.Conv2d(4 * a, 8 * a, 3), *act(8 * a, dropout),                    # 3 x 8
                                 nn.Flatten(), nn.Linear(8 * a * 24, 2))

    def forward(self, x):
        return self.net(x)


def build_model(cfg):
    """The generator described by a run's settings (the network that samples)."""
    return Generator(cfg["width"], cfg["dropout"])


def build_networks(cfg):
    """Every trained network of a run's settings (or a checkpoint's), by name."""
    return dict(generator=build_model(cfg),
                discriminator=Discriminator(cfg["d_width"], cfg["dropout"], cfg["d_norm"] == "batch"),
                regressor=Regressor(cfg["aux_width"], cfg["dropout"]))


# ----------------------------------------------------------------------------------------------------------
# The method: the adversarial loss, the three regularisers (eqs. 2-4) and their targets, the sampler
# ----------------------------------------------------------------------------------------------------------
def adversarial_loss(logit, real):
    """Eq. 1: binary cross-entropy of D's logits against 1 (real=True) or 0; G's non-saturating loss is its
    fakes' logits against 1."""
    return F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, float(real)))


def sdi_term(x1, x2, z1, z2, div):
    """Eq. 3: mean over the batch of f_div * (d_I / d_z)^-1, d_I = L1 distance (sum over pixels) between the
    two generated images G(c, z1), G(c, z2) (the generator's log1p output), d_z = L1 distance between the
    codes. The 1e-5 guard (the authors' code) bounds the term when both images are equal (e.g. both empty)."""
    d_img = (x1 - x2).abs().flatten(1).sum(1)
    d_z = (z1 - z2).abs().sum(1)
    return (div / (d_img / d_z + 1e-5)).mean(), d_img


def intensity_term(fake, photons, form="eq4"):
    """Eq. 4 (form="eq4"), as a batch mean: |raw photon sum of the generated image - photon sum of the real
    response|. form="code", the authors' code (the form l_in 1e-10 was tuned on): the mean over events of
    (photon sum of the real response - the sum of G's log1p outputs over the whole batch)^2."""
    if form == "code":
        return (photons - fake.sum()).pow(2).mean()
    return (torch.expm1(fake.clamp(max=12)).flatten(1).sum(1) - photons).abs().mean()


def aux_term(pred, coords):
    """Eq. 2: mean over the batch of the squared error of the (row, col) prediction, summed over the two
    coordinates (pixels^2)."""
    return (pred - coords).pow(2).sum(1).mean()


def diversity_target(counts, cond_id, norm="dataset"):
    """Per event, the paper's f_div (eq. 3): the sum over pixels of the per-pixel population std of the raw
    counts of all responses with the same condition id, normalised (Sec. 3.2) "by dividing by the length of
    dataset" (norm="dataset": by the number of responses given) or min-max scaled to [0, 1] over the
    conditions as the authors' code does (norm="minmax"). float32 (N,)."""
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


def brightest(counts):
    """(row, col) of the brightest pixel of each image (N, H, W), float32 (N, 2)."""
    counts = np.asarray(counts)
    flat = counts.reshape(len(counts), -1).argmax(1)
    return np.stack([flat // counts.shape[2], flat % counts.shape[2]], 1).astype(np.float32)


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
# Training
# ----------------------------------------------------------------------------------------------------------
def train(args):
    run = data.Run(args, NAME)                  # resume, data, checkpoints, logging, DDP: data.py Part II
    args, split, dev = run.args, run.split, run.device
    use = VARIANTS[args.variant]
    counts = split.counts("train")              # the regularisers' targets of every training event
    photons = torch.as_tensor(counts.reshape(len(counts), -1).sum(1, dtype=np.float64), dtype=torch.float32)
    div = torch.as_tensor(diversity_target(counts, split.ds.cond_id[split.idx["train"]], args.div_norm))
    tensors = (split.x("train"), split.cond("train"), div, photons, torch.as_tensor(brightest(counts)))
    c_va = split.cond("val")[:1000]
    seed = args.seed if args.train_seed < 0 else args.train_seed
    if seed != args.seed:                       # another initialisation and noise on the same data and split
        data.seed_everything(seed)
    gen, disc, aux = (m.to(dev) for m in build_networks(vars(args)).values())
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=tuple(args.betas))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.d_lr, betas=tuple(args.betas))
    opt_a = torch.optim.Adam(aux.parameters(), lr=args.aux_lr, betas=tuple(args.betas))
    n_g, n_d, n_a = (sum(p.numel() for p in m.parameters()) for m in (gen, disc, aux))
    run.plan(len(counts), args.batch_size, n_g, drop_last=True,         # drop_last: BatchNorm; constant LRs
             about=f"{args.variant}: G {n_g:,} + D {n_d:,} + regressor {n_a:,} parameters")
    noise = torch.Generator(dev).manual_seed(seed)
    run.keep(weights=gen, disc=disc, aux=aux, opt_g=opt_g, opt_d=opt_d, opt_a=opt_a, noise=noise)
    G, D, A = (run.wrap(m) for m in (gen, disc, aux))    # torchrun: DDP, and still one process's losses
    if args.amp:
        data.log("note: --amp is used for sampling only; GAN training runs in float32")

    def validate():                             # the generator in eval mode on 1000 validation conditions
        gen.eval()
        fake = sample(gen, c_va.to(dev), torch.Generator().manual_seed(0))
        gen.train()
        empty = ((fake >= 0.5).flatten(1).sum(1) == 0).float().mean()
        val_w = metrics.wasserstein(split.counts("val")[:len(c_va)], fake)[0]
        return dict(val_W=val_w, val_empty=float(empty))
    run.validate = validate

    for x, c, div, photons, coords in run.batches(tensors):
        perm = torch.randperm(len(x), generator=noise, device=noise.device).to(dev)
        fc = c[perm]                            # the fakes' conditions (targets: div, photons, coords[perm])
        z1 = data.noise((len(x), NOISE), noise, dev)
        if "sdi" in use:                        # both SDI images in one pass: shared BatchNorm, dropout masks
            z2 = data.noise((len(x), NOISE), noise, dev)
            fake, fake2 = G(torch.cat([z1, z2]), torch.cat([fc, fc]), paired=True).chunk(2)
        else:
            fake = G(z1, fc)
        real_logit = D(x, c)
        fake_logit = D(fake.detach(), fc)
        d_loss = adversarial_loss(real_logit, True) + adversarial_loss(fake_logit, False)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        logged = dict(d_loss=d_loss, d_real=torch.sigmoid(real_logit).mean(),
                      d_fake=torch.sigmoid(fake_logit).mean())
        if "aux" in use:                        # the regressor learns on real images
            a_loss = aux_term(A(x), coords)
            opt_a.zero_grad(set_to_none=True)
            a_loss.backward()
            opt_a.step()
            logged["aux_real"] = a_loss
        g_loss = adversarial_loss(D(fake, fc), True)                     # non-saturating
        total = g_loss
        if "sdi" in use:
            logged["div_loss"], d_img = sdi_term(fake, fake2, z1, z2, div[perm])
            logged["d_img"] = d_img.mean()
            total = total + args.lambda_div * logged["div_loss"]
        if "int" in use:
            logged["int_loss"] = intensity_term(fake, photons[perm], args.int_form)
            total = total + args.lambda_int * logged["int_loss"]
        if "aux" in use:
            logged["aux_loss"] = aux_term(A(fake), coords[perm])
            total = total + args.lambda_aux * logged["aux_loss"]
        opt_g.zero_grad(set_to_none=True)
        total.backward()
        opt_g.step()
        run.step_done(train_loss=g_loss, g_loss=g_loss, **logged)
    return run.finish()


# ==========================================================================================================
# Appendix B. The command line
# ==========================================================================================================
def get_args(argv=None):
    p = data.parser(__doc__, NAME)
    g = p.add_argument_group("SDI-GAN")
    g.add_argument("--variant", default="sdi-int-aux", choices=list(VARIANTS),
                   help="the paper's ablation row: gan | sdi | sdi-int | sdi-int-aux (default)")
    args = data.parse(p, argv, DEFAULTS, PAPER, SMOKE)
    betas = args.betas
    widths = (args.width, args.d_width, args.aux_width)
    lambdas = (args.lambda_div, args.lambda_int, args.lambda_aux)
    for bad, msg in [(args.detector != "proton", "sdigan_proton.py models the proton calorimeter (ZP 56x30) "
                      "only: leave --detector out or use --detector proton (the neutron one: gan.py)"),
                     (min(args.d_lr, args.aux_lr) <= 0, "d_lr and aux_lr must be positive"),
                     (len(betas) != 2 or not all(0 <= b < 1 for b in betas), "betas takes b1,b2 in [0, 1)"),
                     (min(lambdas) < 0, f"the lambda_* weights must be >= 0 {lambdas}"),
                     (not 0 <= args.dropout < 1, f"dropout must be in [0, 1) (got {args.dropout})"),
                     (any(w < 2 or w % 2 for w in widths), f"widths must be even and >= 2 {widths}"),
                     (args.div_norm not in ("dataset", "minmax"), "div_norm is dataset or minmax"),
                     (args.int_form not in ("eq4", "code"), "int_form is eq4 or code"),
                     (args.d_norm not in ("batch", "none"), "d_norm is batch or none")]:
        if bad:
            p.error(msg)
    return args


def load_sampler(ck, args, device):
    """The Sampler of a checkpoint's generator (its last weights)."""
    gen = build_model(ck["args"]).to(device)
    gen.load_state_dict(ck["weights"])
    return Sampler(gen)


def evaluate(args, ck, sampler, device):
    split = data.split_from_checkpoint(ck)
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("eval.json")
    variant = ck["args"]["variant"]
    generate = data.generator(sampler, device, args.amp)
    return metrics.run_eval(generate, split, path, args, f"{NAME} ({variant})",
                            dict(variant=variant, n_params=ck["n_params"], train_steps=ck["step"]))


if __name__ == "__main__":
    data.main(sys.modules[__name__])
