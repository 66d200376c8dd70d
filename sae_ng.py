"""End-to-end Sinkhorn autoencoder with a noise generator for the ALICE Zero Degree Calorimeters.

Papers: the thesis arXiv 2407.16704 (Sec. 3.3 eq. 3.6 and 3.7, Sec. 4.4, Tables 4.3 and A.1), after Deja
et al.'s e2e Sinkhorn autoencoder (IEEE Access 9, 2021); where the thesis is silent, the authors' code
(github.com/m-wojnar/zdc, zdc/models/autoencoder/sinkhorn.py, noise_generator_mse.py). Published: W 11.34
(Sinkhorn) and 11.19 (l2) on the real neutron set with the ViT pair.

Method. An encoder E(x) -> 20-d code (ReLU, >= 0), a decoder D(code) -> log1p(counts), and a noise generator
NG(z, c) from noise z ~ N(0, I_10) and the 9 standardised particle features c to the code space, end to end:
    loss = sum_pixels (D(E(x)) - x)^2 + beta S({(E(x_i), c_i)}, {(NG(z_i, c_i), c_i)})       (eq. 3.6)
    loss = sum_pixels (D(E(x)) - x)^2 + l2_weight ||E(x) - NG(z, c)||^2            (--matching l2, eq. 3.7)
S: the debiased Sinkhorn divergence of the two clouds, cost |x - y|^2 / 2, eps shrinking from diameter^2 to
blur^2 within every call; the matching term trains the encoder too. Sampling: z -> NG(z, c) -> D -> expm1.
CPU default: a compact conv pair, 4 epochs. --paper: the thesis' ViT pair with the authors' plain ReLUs
(ours pass some gradients straight through), Table A.1's optimiser, 100 epochs; --arch picks the backbone
(cnn; vdvae, the thesis' CNN; vit: Appendix A). Optional stage 2 (ours, --set ng_steps=N): N steps of the
noise generator alone on the frozen encoder's codes.

Usage:
    python sae_ng.py --train                       # ZN, CPU default: end to end, ~11 min on 2 cores
    python sae_ng.py --train --matching l2         # eq. 3.7
    python sae_ng.py --train --paper               # the thesis' ViT pair and optimiser, 100 epochs: a GPU job
    python sae_ng.py --train --resume --set ng_steps=20000   # add stage 2 to a finished run
    python sae_ng.py --eval --ckpt runs/sae_ng/ckpt.pt --max-test 2000 --plot
    python sae_ng.py --sample --ckpt runs/sae_ng/ckpt.pt --n 1000 --out samples.npz

Every setting beside its source, and the deviations from the thesis: docs/fidelity/sae_ng.md.
Runs, sweeps, ablations and their history: docs/models/sae_ng.md.
"""
import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import metrics

# ----------------------------------------------------------------------------------------------------------
# Configuration. Precedence: an explicit flag or --set > --smoke > --paper > CPU default
# ----------------------------------------------------------------------------------------------------------
NAME = "sae_ng"
CODE = 20                                   # code size (thesis Sec. 4.4)
NOISE = 10                                  # noise size (authors' noise_generator_mse.py)
# width, hidden 0: the arch's size in SIZES; ng_batch 0: 512 for l2, 256 for Sinkhorn (stage 2)
DEFAULTS = dict(arch="cnn", matching="sinkhorn", epochs=4, batch_size=256, lr=1e-3, betas=[0.9, 0.999],
                adam_eps=1e-8, weight_decay=0.0, nesterov=False, onecycle=[0.05, 100.0, 100.0], clip=10.0,
                width=0, hidden=0, blocks=4, ng_hidden=32, beta=20.0, l2_weight=10.0, diameter=1e-2,
                blur=1e-5, scaling=0.5, ng_steps=0, ng_batch=0, ng_lr=2e-3, straight_through=True)
# None: Table A.1's optimiser column of the arch (TABLE_A1, below). straight_through: this project's ReLUs
# with a straight-through gradient (the noise generator's and the decoder's output; the ViT's code too);
# false: the authors' plain ReLUs everywhere (--paper; on the toy data they die within 40 steps of the CPU
# budget: docs/models/sae_ng.md). protocol, max_test: the thesis' test (m-wojnar/zdc train_loop)
PAPER = dict(arch="vit", epochs=100, batch_size=256, clip=0.0, scaling=0.95, ng_hidden=128, lr=None,
             betas=None, adam_eps=None, weight_decay=None, nesterov=None, onecycle=None,
             straight_through=False, protocol="pooled", max_test=0)
SMOKE = dict(limit=1500, epochs=1, blocks=1, ng_hidden=8, ng_batch=64, max_test=200, reps=2, ckpt_every=3)
# (width, hidden) of each --arch: CPU default, --paper, --smoke. cnn: conv channels and dense width; vit:
# token width (96, the thesis') and the decoder's input token width (64); vdvae: the CNN's w (64, the thesis')
SIZES = {"cnn": ((8, 64), (16, 64), (4, 16)), "vdvae": ((16, 64), (64, 64), (8, 16)),
         "vit": ((96, 64), (96, 64), (16, 8))}
# Table A.1: the optimiser tuned per backbone (the CNN column: Adam with Nesterov momentum at a constant rate)
TABLE_A1 = {"vit": dict(lr=3.5e-3, betas=[0.64, 0.73], adam_eps=1.5e-7, weight_decay=0.068, nesterov=False,
                        onecycle=[0.32, 35.0, 770.0]),
            "cnn": dict(lr=1.4e-3, betas=[0.76, 0.88], adam_eps=6.1e-8, weight_decay=0.0, nesterov=True,
                        onecycle=[0.0, 1.0, 1.0])}
# the thesis gives "approximately one million parameters" per model (Section 4.4); these are our counts of the
# authors' ViT autoencoder with noise generator
_SRC = "our count of the authors' ViT AE + NG (m-wojnar/zdc noise_generator_mse.py, architectures/vit.py)"
PUBLISHED = {"encoder": (526_388, _SRC), "decoder": (511_585, _SRC), "noise_generator": (474_132, _SRC)}
DEVIATIONS = ("torch's default initialisation (the authors' flax: LeCun-normal dense layers, zero biases)",)


# ----------------------------------------------------------------------------------------------------------
# The default network: a compact conv autoencoder and the noise generator
# ----------------------------------------------------------------------------------------------------------
def conv(ci, co, stride=1):
    return nn.Sequential(nn.Conv2d(ci, co, 3, stride, padding=1), nn.LeakyReLU(0.1))


class Encoder(nn.Module):
    """log1p image (n, 1, H, W) -> 20-d ReLU code: 3x3 convs (w, 2w, 2w channels, the last two with stride 2:
    ZN 44x44 -> 11x11; ZP padded to 56x32 -> 14x8), dense `hidden` -> 20, ReLU; LeakyReLU(0.1)."""

    def __init__(self, shape, width, hidden):
        super().__init__()
        self.shape = tuple(shape)
        flat = 2 * width * math.ceil(shape[0] / 4) * math.ceil(shape[1] / 4)
        self.net = nn.Sequential(conv(1, width), conv(width, 2 * width, 2), conv(2 * width, 2 * width, 2),
                                 nn.Flatten(), nn.Linear(flat, hidden), nn.LeakyReLU(0.1),
                                 nn.Linear(hidden, CODE), nn.ReLU())

    def forward(self, x):
        H, W = self.shape
        return self.net(F.pad(x, (0, -W % 4, 0, -H % 4)))


class Decoder(nn.Module):
    """20-d code -> log1p(counts) image (n, 1, H, W) >= 0: dense 20 -> `hidden` -> (2w, H/4, W/4), two nearest
    x2 upsamplings each followed by a 3x3 conv (w channels), a 3x3 conv to 1 channel, ReLU, crop."""

    def __init__(self, shape, width, hidden, straight_through=False):
        super().__init__()
        self.shape, self.w, self.st = tuple(shape), width, straight_through
        self.h0, self.w0 = math.ceil(shape[0] / 4), math.ceil(shape[1] / 4)
        flat = 2 * width * self.h0 * self.w0
        self.head = nn.Sequential(nn.Linear(CODE, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, flat),
                                  nn.LeakyReLU(0.1))
        self.net = nn.Sequential(nn.Upsample(scale_factor=2), conv(2 * width, width),
                                 nn.Upsample(scale_factor=2), conv(width, width),
                                 nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, code):
        """ReLU output (exact zeros); with straight_through (all but --paper) its gradient passes as if linear:
        a plain ReLU whose input turned negative everywhere stops all reconstruction gradient, and the l2 run
        and the default's 2026-12-06 rerun collapsed that way (docs/models/sae_ng.md). The same outputs either
        way; only training differs."""
        h = self.head(code).view(-1, 2 * self.w, self.h0, self.w0)
        o = self.net(h)
        o = o + (F.relu(o) - o).detach() if self.st else F.relu(o)
        return o[..., :self.shape[0], :self.shape[1]]


class STReLU(nn.Module):
    """ReLU with a straight-through gradient (the same outputs; the gradient passes as if linear), so a unit
    whose input turned negative for every event can recover. The noise generator's codes and the ViT's use
    it, except under --paper (straight_through=false: the authors' plain ReLUs)."""

    def forward(self, h):
        return h + (F.relu(h) - h).detach()


class NoiseGenerator(nn.Module):
    """(noise z, condition c) -> code, as the authors' code: z -> 2h and c -> h, concatenated, 4h, 4h, 20,
    ReLU (straight_through: its gradient passes as if linear, so an output 0 everywhere can recover)."""

    def __init__(self, hidden, n_cond=9, straight_through=True):
        super().__init__()
        act = nn.LeakyReLU(0.2)
        self.relu = STReLU() if straight_through else nn.ReLU()
        self.z = nn.Sequential(nn.Linear(NOISE, 2 * hidden), act)
        self.c = nn.Sequential(nn.Linear(n_cond, hidden), act)
        self.out = nn.Sequential(nn.Linear(3 * hidden, 4 * hidden), act, nn.Linear(4 * hidden, 4 * hidden),
                                 act, nn.Linear(4 * hidden, CODE))

    def forward(self, z, cond):
        return self.relu(self.out(torch.cat([self.z(z), self.c(cond)], 1)))


class SAE(nn.Module):
    """Autoencoder (image <-> 20-d ReLU code) and noise generator (noise, condition) -> code. --arch vit:
    the encoder is the ViT encoder (no condition token), its 36 x 96 tokens flattened, dense to 20, ReLU; the
    decoder a dense 20 -> 36 x 64 tokens and the ViT decoder (no condition token), as the authors' code.
    --arch vdvae: the thesis' CNN pair in the same places (5x5 tokens of 4w; dense 20 -> 6x6 tokens of
    `hidden`)."""

    def __init__(self, shape, width=8, hidden=64, ng_hidden=32, arch="cnn", blocks=4, straight_through=False,
                 ng_straight_through=True):
        super().__init__()
        self.ng = NoiseGenerator(ng_hidden, straight_through=ng_straight_through)
        if arch == "cnn":
            self.enc = Encoder(shape, width, hidden)
            self.dec = Decoder(shape, width, hidden, straight_through)
            return
        vit = arch == "vit"
        (eh, ew), (gh, gw) = (vit_grid(shape),) * 2 if vit else conv_grids(shape)
        self.enc = nn.Sequential(ViTEncoder(shape, width, blocks) if vit else ConvEncoder(width),
                                 nn.Flatten(), nn.Linear(eh * ew * (width if vit else 4 * width), CODE),
                                 STReLU() if straight_through else nn.ReLU())
        kw = dict(offset=0.5, straight_through=straight_through)
        self.dec = nn.Sequential(nn.Linear(CODE, gh * gw * hidden), nn.Unflatten(1, (gh * gw, hidden)),
                                 ViTDecoder(shape, hidden, width, blocks, **kw) if vit
                                 else ConvDecoder(shape, hidden, width, **kw))

    def encode(self, x):
        return self.enc(x)

    def decode(self, code):
        return self.dec(code)

    def generate_code(self, z, cond):
        return self.ng(z, cond)


def build_model(cfg):
    """The autoencoder and noise generator of a run's settings (or a checkpoint's). straight_through (not
    under --paper): the noise generator's output ReLU and the decoder's output (cnn, vit; the ViT's code too,
    and vdvae's with --matching l2) pass their gradient straight through: plain ones died in those runs, the
    CPU default's too (docs/models/sae_ng.md). Forward outputs are the same, so old checkpoints sample alike."""
    ours = cfg.get("straight_through", True)            # (checkpoints written before the setting: True)
    st = ours and (cfg["matching"] == "l2" or cfg["arch"] in ("cnn", "vit"))
    return SAE(data.SHAPES[cfg["detector"]], cfg["width"], cfg["hidden"], cfg["ng_hidden"], cfg["arch"],
               cfg["blocks"], straight_through=st, ng_straight_through=ours)


def build_networks(cfg):
    """Every trained network by name (parameter counts: tests/test_fidelity.py against PUBLISHED)."""
    m = build_model(cfg)
    return {"encoder": m.enc, "decoder": m.dec, "noise_generator": m.ng}


# ----------------------------------------------------------------------------------------------------------
# The method: loss, Sinkhorn divergence and sampler
# ----------------------------------------------------------------------------------------------------------
def sae_loss(model, x, cond, generator, args):
    """(loss, reconstruction, matching term, codes) of a batch (stage 1: everything trains on everything).
    Reconstruction: squared error on log1p(counts), summed over pixels, mean over the batch."""
    code = model.encode(x)
    rec = (model.decode(code) - x).pow(2).flatten(1).sum(1).mean()
    fake = model.generate_code(data.noise((len(x), NOISE), generator, x.device), cond)
    match = matching(code, fake, cond, args)
    return rec + (args.l2_weight if args.matching == "l2" else args.beta) * match, rec, match, (code, fake)


def matching(target, fake, cond, args):
    """The code matching term: ||target - fake||^2 (l2, eq. 3.7; summed over the code, mean over the batch),
    or the Sinkhorn divergence between the 29-d clouds of (code, condition) (eq. 3.6). The same conditions
    stand on both sides, so the plan pairs points of equal or nearby particles."""
    if args.matching == "l2":
        return (target - fake).pow(2).sum(1).mean()
    return sinkhorn_divergence(torch.cat([target, cond], 1), torch.cat([fake, cond], 1),
                               eps_schedule(args.diameter, args.blur, args.scaling))


def sinkhorn_divergence(x, y, eps_list):
    """Debiased Sinkhorn divergence between uniform clouds x, y (n, d), cost |x - y|^2 / 2, as the authors'
    code: the potentials of OT(x, y), OT(x, x), OT(y, y) by symmetric log-domain updates (old and new
    averaged) through eps_list, then S = <a, f_xy - f_xx> + <b, g_yx - g_yy>, each potential one last
    softmin at eps_list[-1], differentiated through the cost only (the gradient is the transport plan's).
    Float32 under autocast: at eps 1e-10 the softmin is a hard minimum, exact through logsumexp."""
    if len(x) != len(y):
        raise ValueError(f"clouds of {len(x)} and {len(y)} points: this solver pairs equal batches")
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        # C[k] for (rows, columns) = (x, x), (x, y), (y, x), (y, y); gradient through the rows' points only
        C = torch.stack([(a[:, None] - b.detach()[None]).pow(2).sum(-1) / 2
                         for a, b in ((x, x), (x, y), (y, x), (y, y))])
        log_w = -math.log(len(x))
        cols = [0, 2, 1, 3]                     # potentials on the columns' side: f_xx, g_yx, f_xy, g_yy

        def softmin(eps, C, pot):   # pot: (4, n) potentials [f_xx, f_xy, g_yx, g_yy], all updated at once
            return -eps * torch.logsumexp((log_w + pot[cols] / eps)[:, None] - C / eps, 2)

        with torch.no_grad():
            Cd = C.detach()
            pot = -eps_list[0] * torch.logsumexp(log_w - Cd / eps_list[0], 2)
            for eps in eps_list:
                pot = (pot + softmin(eps, Cd, pot)) / 2
        f_xx, f_xy, g_yx, g_yy = softmin(eps_list[-1], C, pot)
        return (f_xy - f_xx).mean() + (g_yx - g_yy).mean()


@functools.lru_cache(maxsize=8)
def eps_schedule(diameter, blur, scaling):
    """The eps values of one Sinkhorn call, as the authors' code: diameter^2, then diameter^2 * scaling^(2k)
    (k = 0, 1, ... while above blur^2; so diameter^2 appears twice), then blur^2. The authors' 1e-2, 1e-5,
    0.95: 137 updates; the CPU default's scaling 0.5: 12."""
    n = math.ceil(math.log(blur / diameter) / math.log(scaling) - 1e-9)
    return (diameter ** 2,) + tuple(diameter ** 2 * scaling ** (2 * k) for k in range(n)) + (blur ** 2,)


class Sampler(data.Sampler):
    """The sampler as one module (bench.py, --export): counts from cond (n, 9) and z (n, NOISE)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def noise_shapes(self, n):
        return {"z": (n, NOISE)}

    def forward(self, cond, z):
        return data.to_counts(self.model.decode(self.model.generate_code(z, cond)))


@torch.no_grad()
def sample(model, cond, generator=None):
    """Raw photon counts (n, H, W) for standardised conditions `cond` (n, 9): noise -> NG -> decoder. Noise
    is drawn on the CPU from `generator` and moved to the model's device (a seed gives the same samples
    anywhere)."""
    return Sampler(model).run(cond, generator)


@torch.no_grad()
def reconstruct(model, x):
    """Encode -> decode of log1p images: raw counts (n, H, W)."""
    return data.to_counts(model.decode(model.encode(x)))


def one_cycle(step, total, warmup, div, final_div):
    """LR factor of the cosine one-cycle schedule (optax.cosine_onecycle_schedule, torch's OneCycleLR):
    cosine from 1/div up to 1 over the first `warmup` fraction of `total` steps, then cosine down to
    1/(div*final_div)."""
    w = warmup * total
    if step < w:
        t, start, end = step / w, 1 / div, 1.0
    else:
        t, start, end = min((step - w) / max(total - w, 1), 1.0), 1.0, 1 / (div * final_div)
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def train(args):
    ng_steps = args.ng_steps                    # stage 2's length: on --resume, the larger of given and saved
    run = data.Run(args, NAME)                  # resume, data, checkpoints, logging, DDP: data.py Part II
    args, split, dev = run.args, run.split, run.device
    args.ng_steps = max(ng_steps, args.ng_steps)          # --resume --set ng_steps=N adds stage 2 to a run
    x_tr, c_tr = split.x("train"), split.cond("train")
    x_va, c_va = split.x("val")[:2000], split.cond("val")[:2000]
    model = build_model(vars(args)).to(dev)
    if args.nesterov:           # optax.adam(nesterov=True): torch's NAdam, momentum schedule off (mu_t = b1)
        opt = torch.optim.NAdam(model.parameters(), lr=args.lr, betas=tuple(args.betas), eps=args.adam_eps,
                                weight_decay=args.weight_decay, decoupled_weight_decay=True,
                                momentum_decay=1e9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas), eps=args.adam_eps,
                                weight_decay=args.weight_decay)
    opt_ng = torch.optim.Adam(model.ng.parameters(), lr=args.ng_lr)                # stage 2
    n_params = sum(p.numel() for p in model.parameters())
    about = f"{n_params:,} parameters, {args.matching} matching, stage 2: {args.ng_steps} steps"
    planned = run.plan(len(x_tr), args.batch_size, n_params, about=about)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: one_cycle(s, planned, *args.onecycle))
    sched_ng = torch.optim.lr_scheduler.LambdaLR(
        opt_ng, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(args.ng_steps, 1), 1.0))))
    scaler = data.grad_scaler(args.amp, dev)
    noise = torch.Generator(dev).manual_seed(args.seed)
    pick = torch.Generator().manual_seed(args.seed + 1)   # stage 2's random batches
    run.keep(weights=model, opt=opt, sched=sched, opt_ng=opt_ng, sched_ng=sched_ng, scaler=scaler,
             noise=noise, pick=pick)
    net = run.wrap(model)                       # under torchrun: DDP, and still one process's loss exactly

    def validate():                             # 500 validation events, 1000 generated, 1000 reconstructed
        k = min(1000, len(x_va))
        model.eval()
        with torch.no_grad():
            g = torch.Generator(dev).manual_seed(1234)
            _, rec, match, (code, fake) = sae_loss(model, x_va[:500].to(dev), c_va[:500].to(dev), g, args)
            gen = sample(model, c_va[:k].to(dev), torch.Generator().manual_seed(0))
            recon = reconstruct(model, x_va[:k].to(dev))
        model.train()
        true = split.counts("val")[:k]
        return dict(stage=1 if run.step <= planned else 2, lr=opt.param_groups[0]["lr"], val_rec=rec.item(),
                    val_match=match.item(), code_std=float(code.std(0).mean()),
                    ng_std=float(fake.std(0).mean()), val_W=metrics.wasserstein(true, gen)[0],
                    rec_W=metrics.wasserstein(true, recon)[0])
    run.validate = validate

    def optimise(loss, optimiser, scheduler, params):
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip > 0:
            scaler.unscale_(optimiser)
            nn.utils.clip_grad_norm_(params, args.clip)
        scaler.step(optimiser)
        scaler.update()
        scheduler.step()

    for x, c in run.batches((x_tr, c_tr)):      # stage 1: autoencoder and noise generator, end to end
        with data.autocast(dev, args.amp):
            loss, _, match, _ = sae_loss(net, x, c, noise, args)   # under DDP: Sinkhorn on the gathered codes
        optimise(loss, opt, sched, model.parameters())
        run.step_done(train_loss=loss, train_match=match)

    total = min(planned + args.ng_steps, args.max_steps or planned + args.ng_steps)     # both stages' steps
    if run.step < total:                        # stage 2: the noise generator alone, on the encoder's codes
        with torch.no_grad():                   # (every rank trains it on the whole batch, identically)
            codes = torch.cat([model.encode(b.to(dev)) for b in torch.split(x_tr, 4096)])
        conds = c_tr.to(dev)
        data.log(f"stage 2: noise generator on {len(codes):,} cached codes, batch {args.ng_batch}, steps "
                 f"{run.step - planned}..{total - planned} of {args.ng_steps}")
        run.total = total                       # (data.Run has no loop over batches drawn by the script)
        run.bar = tqdm(range(run.step, total), desc="stage 2", leave=False,
                       disable=args.smoke or not run.dist.is_main)
        for _ in run.bar:
            i = torch.randint(len(codes), (args.ng_batch,), generator=pick).to(dev)
            with data.autocast(dev, args.amp):
                fake = model.generate_code(data.noise((len(i), NOISE), noise, dev), conds[i])
                loss = matching(codes[i], fake, conds[i], args)
            optimise(loss, opt_ng, sched_ng, model.ng.parameters())
            run.step_done(train_loss=loss, train_match=loss)
        run.save()
    return run.finish()


# ==========================================================================================================
# Appendix A. The thesis' ViT pair (Sec. 4.4; --arch vit, --paper) and CNN pair (--arch vdvae), written out in
# the same words in vae.py, sae_ng.py, gan.py, vqgan.py (tests/test_vit.py)
# ==========================================================================================================
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



# ==========================================================================================================
# Appendix B. The command line
# ==========================================================================================================
def get_args(argv=None):
    p = data.parser(__doc__, NAME)
    g = p.add_argument_group("Sinkhorn autoencoder with noise generator")
    g.add_argument("--arch", choices=list(SIZES), help="backbone: cnn (compact conv pair, CPU default), "
                   "vdvae (the thesis' CNN) or vit (the thesis' ViT, --paper)")
    g.add_argument("--matching", choices=["sinkhorn", "l2"],
                   help="code matching term: Sinkhorn divergence (eq. 3.6, default) or l2 (eq. 3.7)")
    args = data.parse(p, argv, DEFAULTS, PAPER, SMOKE)
    width, hidden = SIZES.get(args.arch, SIZES["cnn"])[2 if args.smoke else 1 if args.paper else 0]
    args.width = args.width or width            # 0: the arch's size
    args.hidden = args.hidden or hidden
    for k, v in TABLE_A1["vit" if args.arch == "vit" else "cnn"].items():
        if getattr(args, k) is None:            # --paper: Table A.1's column of the backbone
            setattr(args, k, v)
    args.ng_batch = args.ng_batch or (512 if args.matching == "l2" else 256)       # stage 2's batch
    onecycle = args.onecycle
    for bad, msg in [(args.arch not in SIZES, f"arch: one of {', '.join(SIZES)} (got {args.arch!r})"),
                     (args.matching not in ("sinkhorn", "l2"), f"matching: sinkhorn or l2 ({args.matching})"),
                     (min(args.beta, args.l2_weight) < 0, "beta and l2_weight must be >= 0"),
                     (not 0 < args.blur < args.diameter, "need 0 < blur < diameter"),
                     (not 0 < args.scaling < 1, f"need 0 < scaling < 1 (got {args.scaling})"),
                     (args.ng_steps < 0 or not args.ng_lr > 0, "ng_steps must be >= 0 and ng_lr positive"),
                     (min(args.weight_decay, args.clip) < 0, "weight_decay and clip must be >= 0"),
                     (not args.adam_eps > 0, "adam_eps must be positive"),
                     (len(args.betas) != 2 or not all(0 <= b < 1 for b in args.betas),
                      "betas takes b1,b2 in [0, 1)"),
                     (len(onecycle) != 3 or not 0 <= onecycle[0] < 1 or min(onecycle[1:]) < 1,
                      "onecycle takes WARMUP,DIV,FINAL_DIV: a warm-up fraction in [0, 1), both DIVs >= 1"),
                     (min(args.width, args.hidden, args.blocks, args.ng_hidden, args.ng_batch) <= 0,
                      "width, hidden, blocks, ng_hidden and ng_batch must be positive"),
                     (args.arch == "vit" and args.width % 4,
                      f"width {args.width}: the ViT's 4 attention heads need a multiple of 4")]:
        if bad:
            p.error(msg)
    return args


def load_sampler(ck, args, device):
    """The Sampler of a checkpoint's weights: noise -> noise generator -> decoder."""
    model = build_model(ck["args"]).to(device)
    model.load_state_dict(ck["weights"])
    return Sampler(model)


def evaluate(args, ck, sampler, device):
    """The protocol's evaluation (metrics.run_eval), and the reconstruction W: encode -> decode of the test
    responses, the best the decoder can do."""
    split = data.split_from_checkpoint(ck)
    _, true, _ = metrics.test_part(split, args.max_test or None)
    rec = torch.cat([reconstruct(sampler.model, x.to(device)).cpu()
                     for x in torch.split(data.to_log(true), 1024)])
    rec_w = metrics.wasserstein(true, rec)[0]
    print(f"reconstruction Wasserstein (encode -> decode of the test responses): {rec_w:.3f}")
    path = Path(args.ckpt or Path(args.out) / "ckpt.pt").with_name("eval.json")
    cfg = ck["args"]
    arch = "" if cfg["arch"] == "cnn" else f", {cfg['arch']}"
    return metrics.run_eval(data.generator(sampler, device, args.amp), split, path, args,
                            f"{NAME} ({cfg['matching']}{arch})",
                            dict(reconstruction_W=rec_w, matching=cfg["matching"], n_params=ck["n_params"],
                                 train_steps=ck["step"]))


if __name__ == "__main__":
    data.main(sys.modules[__name__])
