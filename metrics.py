"""Metrics and the evaluation protocol for the ZDC fast-simulation models.

Channels (the published convention, both detectors): with h = H // 2 and w = W // 2, channels 1-4 are the
pixels with (row + col) even in the quadrants [:h, :w], [:h, w:], [h:, :w], [h:, w:]; channel 5 is every
pixel with (row + col) odd. All metrics work on raw photon counts (never on log1p values).

- Wasserstein: exact 1-D Wasserstein-1 distance between the true and generated distributions of each channel
  sum (identical to scipy.stats.wasserstein_distance), averaged over the 5 channels. Lower is better.
- MAE: mean |true channel sum - generated channel sum| over events and channels, each generated event
  paired with the true event of the same condition.
- RMSE: per-pixel root mean squared error on raw counts, paired the same way.
- empty: fraction of generated responses with no pixel >= 0.5 photons.
- diversity error: mean over conditions of |std(generated photon sum) - std(true photon sum)|, divided by the
  mean true std; 0 means the model reproduces how much responses vary for a fixed particle.

Shower metrics (the fast-calorimeter-simulation community's benchmark, CaloChallenge 2022, arXiv 2410.21611;
Kansal et al., arXiv 2211.10295; none of the ZDC publications reports them). W judges the channel sums only: a
collapsed model that draws every particle's smooth mean blob can score well on it. These judge the shower,
always on the first SHOWER_N (2,000) test events so rows compare whatever --max-test is:
- high-level features of each response (shower_features): photon sum, 5 channel sums, centre of gravity x/y,
  width x/y, brightest pixel, number of lit pixels;
- separation: the separation power (triangular discrimination, 0 = same histogram, 1 = disjoint) of each
  feature's histogram, true vs generated, on 30 quantile bins of the true values plus under/overflow bins,
  averaged over the 12 features (each also stored as sep_<feature>);
- fpd / kpd: Frechet and kernel (unbiased MMD^2, quartic polynomial kernel as in JetNet's KPD) physics distances
  of the features, count-valued ones log1p'd, all standardised by the true responses' mean and std; 0 = same
  distribution. KPD leaves out the pairs of events that share a particle (kernel_distance), so the floor scores
  ~0 (-0.0007 +- 0.0008 on ZN random, first 2,000 test events; -0.0075 with the earlier estimator);
- auc: a classifier two-sample test: an MLP on the standardised features and the particle's 9 features learns
  to tell generated from true on one half of the events, AUC on the other half: 0.5 = indistinguishable.
  It is the only metric that checks conditioning (true showers given to the wrong particles score separation 0
  and FPD 0 but AUC 0.84), and it is weak by design (800 + 800 training events: an 8 % gain error still scores
  0.516).
The floor row's values (finite-sample noise: separation ~0.005, FPD ~0.01, KPD ~0, AUC ~0.5) are the
calibration: a model can only be judged against them.

Protocol (version 2, issue 36): `evaluate(generate, split)` generates once for every test condition, `reps` times
with different seeds, and reports the mean and std over the repetitions of each metric. That std leaves out the
test-set noise (which events are in the test set), so run_eval adds 95 % intervals from a bootstrap over test
particles (all events of a resampled particle together, the same draws for the model, the floor and the lookup:
paired) for W, W / floor (a ratio interval), the AUC and the shower metrics separation, FPD and KPD (boot_shower),
and paired intervals of the model - lookup and model - floor differences; it writes every row's per-event channel
sums and shower features to <eval>.sums.npz, so `python metrics.py --compare A.json B.json` gives the paired
interval of the difference of two models on the same events. W comes
in two forms: the mean of the repetitions' W (the default) and the publications' pooled W (one W of all
repetitions together against the test set; on the first 2,000 ZN random test events the floor is 2.07 as a
mean of 5 and 1.66 pooled); `--max-test 0` is the whole test split. Every eval.json records its protocol and
the results tables never put rows of different protocols in one table. Two reference rows go beside every
model:
- floor: an independent toy re-simulation of the test conditions (`data.resimulate`) scored against the test
  set. No model can beat it except by chance; report W / floor.
- lookup: for each test condition, a random training response of the nearest training condition (in
  standardised features). On the random split that is the same particle, so it is nearly the floor; on the
  condition-disjoint split it shows what a model adds by generalising to unseen particles.
W depends on the number of samples (finite-sample noise), so rows are only comparable at the same `max_test`.

Command line: `python metrics.py --data toy` prints the data statistics next to the published targets and the
floor and lookup rows (with their intervals) for both detectors and both split modes; `--references DIR` also
writes them as reference_<detector>_<split>.json; `--plot DIR` writes sample grids and channel histograms of the
data (PNG); `--compare A.json B.json` compares two evaluations on the same events.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.spatial import cKDTree
from tqdm import tqdm

import data

# ----------------------------------------------------------------------------------------------------------
# Channels and distances
# ----------------------------------------------------------------------------------------------------------


CHANNELS = data.CHANNEL_PARITIES


def channel_masks(shape, channels="even"):
    """(5, H, W) boolean masks of the 5 photomultiplier channels: channels 1-4 read the (row + col)-even pixels of
    their quadrant and channel 5 the odd ones (DATA.md); channels="odd" swaps the two parities (the proton paper's
    code, sin-gan-proton-aux-reg-1.py: --channels odd)."""
    if channels not in CHANNELS:
        raise ValueError(f"channels {channels!r}: use one of {', '.join(CHANNELS)}")
    H, W = shape
    h, w = H // 2, W // 2
    r, c = np.indices((H, W))
    quad_px = (r + c) % 2 == (0 if channels == "even" else 1)
    quads = [(r < h) & (c < w), (r < h) & (c >= w), (r >= h) & (c < w), (r >= h) & (c >= w)]
    return np.stack([quad_px & q for q in quads] + [~quad_px])


def as_counts(x):
    """Raw counts as float64 numpy (N, H, W) from a tensor or array of shape (N, H, W) or (N, 1, H, W)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x[:, 0] if x.ndim == 4 else x


def channel_sums(counts, channels="even"):
    """(N, 5) channel sums of raw counts (N, H, W) (channels: see channel_masks)."""
    counts = as_counts(counts)
    m = channel_masks(counts.shape[1:], channels).reshape(5, -1).astype(np.float64)
    return counts.reshape(len(counts), -1) @ m.T


def wasserstein_1d(u, v):
    """Exact 1-D Wasserstein-1 distance between the columns of u (n, C) and v (m, C): (C,) array.
    Same value as scipy.stats.wasserstein_distance per column, vectorised over columns: integrate
    |F_u - F_v| over the merged sorted sample."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    if u.ndim == 1:
        return wasserstein_1d(u[:, None], v[:, None])[0]
    n, m = len(u), len(v)
    allv = np.concatenate([u, v], 0)
    order = np.argsort(allv, axis=0, kind="stable")
    xs = np.take_along_axis(allv, order, 0)
    from_u = order < n
    cdf_u = np.cumsum(from_u, 0)[:-1] / n        # F_u just right of each merged point
    cdf_v = np.cumsum(~from_u, 0)[:-1] / m
    return (np.abs(cdf_u - cdf_v) * np.diff(xs, axis=0)).sum(0)


def wasserstein(true, gen):
    """(mean over channels, per-channel array) of the channel-sum Wasserstein distance."""
    w = wasserstein_1d(channel_sums(true), channel_sums(gen))
    return float(w.mean()), w


def condition_weights(cond_id, n_boot=200, seed=0):
    """(n_boot, n) bootstrap weights of n test events that resample their distinct conditions (test particles)
    with replacement: every event of a condition drawn k times gets weight k, so events of one particle stay
    together (a particle's responses are not independent). The rows sum to about n."""
    _, inv = np.unique(np.asarray(cond_id), return_inverse=True)
    inv = inv.ravel()
    k = int(inv.max()) + 1
    draws = np.random.default_rng([30_000, seed]).integers(0, k, (n_boot, k))
    counts = np.bincount((draws + k * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * k)
    return counts.reshape(n_boot, k)[:, inv].astype(np.float64)


def weighted_wasserstein(true_sums, gen_sums, weights, pooled=False, chunk=50):
    """Bootstrap Wasserstein, vectorised: W (mean over the 5 channels) of every row of `weights` (B, n), for
    true channel sums (n, C) against generated ones (reps, n, C), event i of every repetition weighted like true
    event i (paired: a resampled particle brings its true and its generated responses). pooled=False: the mean
    over repetitions of each repetition's W (this repository's protocol); pooled=True: one W of the true sums
    against all repetitions concatenated (the publications' code). Unit weights give exactly wasserstein_1d.
    Returns (B,). The merged sort does not depend on the weights, so it is done once per channel."""
    true_sums, gen_sums = np.asarray(true_sums, np.float64), np.asarray(gen_sums, np.float64)
    weights = np.atleast_2d(np.asarray(weights, np.float64))
    reps, n, C = gen_sums.shape
    groups = [gen_sums.reshape(1, reps * n, C)] if pooled else [g[None] for g in gen_sums]
    out = np.zeros(len(weights))
    for g in groups:
        m = g.shape[1]
        for c in range(C):
            allv = np.r_[true_sums[:, c], g[0, :, c]]
            order = np.argsort(allv, kind="stable")
            dx = np.diff(allv[order])
            for b in range(0, len(weights), chunk):
                w = weights[b:b + chunk]
                wt = w / w.sum(1, keepdims=True)
                wg = np.tile(wt, m // n)                          # pooled: the same weight in every repetition
                signed = np.c_[wt, -wg / (m // n)][:, order]
                out[b:b + chunk] += np.abs(np.cumsum(signed, 1)[:, :-1]) @ dx
    return out / (C * len(groups))


def interval(boot, point, level=0.95):
    """A normal interval from bootstrap draws: point -+ z sd(draws). Centred on the point estimate, not on the
    draws' percentiles: W of a resampled set is biased upward (a resample holds fewer distinct events), so
    percentile intervals of W sit too high; the spread is what the bootstrap is used for."""
    from scipy.stats import norm
    z = norm.ppf(0.5 + level / 2)
    sd = float(np.std(boot, ddof=1))
    return [float(point - z * sd), float(point + z * sd)]


def ratio_interval(boot_num, boot_den, point, level=0.95):
    """Interval of a ratio (W / floor) from paired bootstrap draws of numerator and denominator: normal on the log
    scale, centred on the point estimate (the ratio is positive and skewed)."""
    lo, hi = interval(np.log(np.maximum(boot_num, 1e-300)) - np.log(np.maximum(boot_den, 1e-300)), np.log(point), level)
    return [float(np.exp(lo)), float(np.exp(hi))]


def diversity_error(true_total, gen_total, cond_id):
    """Relative error of the per-condition spread of the photon sum (conditions with >= 2 events)."""
    _, inv, cnt = np.unique(cond_id, return_inverse=True, return_counts=True)
    keep = cnt[inv] >= 2
    if not keep.any():
        return float("nan")

    def std(x):
        s1 = np.bincount(inv[keep], x[keep], len(cnt))
        s2 = np.bincount(inv[keep], x[keep] ** 2, len(cnt))
        c = np.maximum(np.bincount(inv[keep], minlength=len(cnt)), 1)
        return np.sqrt(np.maximum(s2 / c - (s1 / c) ** 2, 0))[cnt >= 2]

    st, sg = std(true_total), std(gen_total)
    return float(np.abs(sg - st).mean() / max(st.mean(), 1e-12))


def score(true, gen, cond_id, pdg, cond=None, shower=True, seed=0, record=None, channels="even"):
    """Every metric of one repetition: generated `gen` vs `true`, event by event for the same conditions; with
    shower=True also the shower metrics (shower_scores: `cond` feeds the classifier, `seed` its fit). record: a
    dict that receives the generated channel sums ("sums", float32) and the classifier's held-out scores.
    channels: the channel convention of W, MAE and the recorded sums (channel_masks; the shower features keep
    DATA.md's)."""
    true, gen = as_counts(true), as_counts(gen)
    if true.shape != gen.shape:
        raise ValueError(f"generated responses have shape {gen.shape}, expected {true.shape}")
    if not np.isfinite(gen).all():
        raise ValueError("generated responses contain NaN or inf")
    st, sg = channel_sums(true, channels), channel_sums(gen, channels)
    w_ch = wasserstein_1d(st, sg)
    out = dict(W=float(w_ch.mean()), **{f"W_ch{i + 1}": float(w) for i, w in enumerate(w_ch)},
               MAE=float(np.abs(st - sg).mean()), RMSE=float(np.sqrt(np.mean((true - gen) ** 2))),
               empty=float(np.mean((gen >= 0.5).reshape(len(gen), -1).sum(1) == 0)),
               div_err=diversity_error(st.sum(1), sg.sum(1), cond_id))
    for code in np.unique(pdg):
        sel = pdg == code
        if sel.sum() >= 100:
            name = data.PDG_NAMES.get(int(code), str(int(code)))
            out[f"W_{name}"] = float(wasserstein_1d(st[sel], sg[sel]).mean())
    if record is not None:
        record["sums"] = sg.astype(np.float32)
    if shower:
        out.update(shower_scores(true, gen, cond, seed, groups=cond_id,
                                 record=None if record is None else record.setdefault("auc", {})))
        if record is not None:                   # for the bootstrap of the shower metrics (boot_shower)
            record["true_feats"] = shower_features(true[:SHOWER_N])
            record["feats"] = shower_features(gen[:SHOWER_N])
    return out


def summarize(reps):
    """List of per-repetition score dicts -> {metric: [mean, std]} over repetitions."""
    keys = [k for k in reps[0] if all(k in r for r in reps)]
    return {k: [float(np.mean([r[k] for r in reps])), float(np.std([r[k] for r in reps]))] for k in keys}


# ----------------------------------------------------------------------------------------------------------
# Shower evaluation (CaloChallenge 2022, arXiv 2410.21611; Kansal et al., arXiv 2211.10295): does a generated
# response look like a shower, not only have the right channel sums?
# ----------------------------------------------------------------------------------------------------------
FEATURES = ["sum", "ch1", "ch2", "ch3", "ch4", "ch5", "cog_x", "cog_y", "width_x", "width_y", "max_px", "n_lit"]
LOG_FEATURES = [0, 1, 2, 3, 4, 5, 10, 11]   # count-valued features: log1p before FPD, KPD and the classifier
SHOWER_N = 2000                              # events scored by the shower metrics: fixed, so rows compare


def shower_features(counts):
    """(N, 12) high-level features of raw-count responses, in the order of FEATURES: photon sum, the 5 channel
    sums, centre of gravity x and y (pixels; x = axis 0, y = axis 1), shower width x and y (square root of the
    second central moment, pixels), brightest pixel, number of lit pixels (>= 0.5, i.e. at least one photon once
    rounded). An empty response (sum 0) has its centre of gravity at the image centre and width 0: no NaN."""
    counts = as_counts(counts)
    n, H, W = counts.shape
    total = counts.reshape(n, -1).sum(1)
    safe = np.where(total > 0, total, 1.0)
    px, py = counts.sum(2), counts.sum(1)                     # projections on x (axis 0) and y (axis 1)
    x, y = np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64)
    cx, cy = px @ x / safe, py @ y / safe
    wx = np.sqrt(np.maximum(px @ x ** 2 / safe - cx ** 2, 0))
    wy = np.sqrt(np.maximum(py @ y ** 2 / safe - cy ** 2, 0))
    empty = total <= 0
    cx[empty], cy[empty], wx[empty], wy[empty] = (H - 1) / 2, (W - 1) / 2, 0.0, 0.0
    flat = counts.reshape(n, -1)
    return np.c_[total, channel_sums(counts), cx, cy, wx, wy, flat.max(1), (flat >= 0.5).sum(1)]


def separation_bins(true_col, bins=30):
    """The bin edges of separation_power for one feature: `bins` quantiles of the true column (ties merged), plus an
    underflow and an overflow bin, so values outside the true range (e.g. overbright outliers) are counted apart,
    not folded into the end bins. np.searchsorted(edges, x, "right") - 1 is the bin of x (np.histogram's)."""
    inner = np.unique(np.quantile(true_col, np.linspace(0, 1, bins + 1)))
    inner[-1] = np.nextafter(inner[-1], np.inf)                # the true maximum belongs to the last inner bin
    return np.r_[-np.inf, inner, np.inf]


def separation_power(true, gen, bins=30):
    """Per-column separation power (triangular discrimination) 1/2 sum_i (p_i - q_i)^2 / (p_i + q_i) of the
    normalised histograms of true (n, F) and gen (m, F), binned by separation_bins: 0 for identical histograms,
    1 for disjoint ones."""
    true, gen = np.asarray(true, np.float64), np.asarray(gen, np.float64)
    out = np.empty(true.shape[1])
    for k in range(true.shape[1]):
        edges = separation_bins(true[:, k], bins)
        p = np.histogram(true[:, k], edges)[0] / len(true)
        q = np.histogram(gen[:, k], edges)[0] / len(gen)
        s = p + q > 0
        out[k] = 0.5 * np.sum((p[s] - q[s]) ** 2 / (p[s] + q[s]))
    return out


def standardized_features(feats, ref):
    """log1p of the count-valued features, then standardised with the mean and std of `ref` (the true
    responses' features, the same for every row of an evaluation)."""
    def tf(f):
        f = np.array(f, np.float64)
        f[:, LOG_FEATURES] = np.log1p(np.maximum(f[:, LOG_FEATURES], 0))
        return f
    r = tf(ref)
    return (tf(feats) - r.mean(0)) / np.maximum(r.std(0), 1e-12)


def frechet_distance(x, y):
    """Frechet distance of Gaussian fits to the rows of x and y: |mu_x - mu_y|^2 + Tr(Sx + Sy - 2 (Sx Sy)^1/2)."""
    from scipy.linalg import sqrtm
    sx, sy = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    root = sqrtm(sx @ sy)
    root = root.real if np.iscomplexobj(root) else root
    return float(max(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(sx + sy - 2 * root), 0.0))


KPD_DEGREE = 4                               # the quartic kernel of JetNet's KPD (Kansal et al.); KID uses 3


def kernel_distance(x, y, groups=None, degree=KPD_DEGREE):
    """KPD: unbiased MMD^2 with the polynomial kernel k(a, b) = (a.b / d + 1)^degree (quartic, as in Kansal et al.'s
    kernel physics distance). groups=None: x and y are independent samples; the within-sample terms leave out the
    i = i pairs (the usual unbiased estimator). groups (n,): x and y are paired row by row, row i of both drawn
    for the same particle (as the floor, a model and the lookup are here), and rows with equal groups share a
    particle; then every pair of rows that shares a particle is left out of all three terms. Why: with the
    usual estimator the cross term keeps the same-particle pairs (x_i, y_i), which are more alike than the
    others, while the within-sample terms leave their own out, so a perfect model scores below 0 (-0.0075 for
    the floor on ZN with the cubic kernel). With those pairs left out everywhere, every term averages pairs of
    different particles and a perfect model scores 0 in expectation."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** degree for a, b in ((x, x), (y, y), (x, y)))
    if groups is None:
        n, m = len(x), len(y)
        return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                     - 2 * kxy.mean())
    groups = np.asarray(groups)
    if not (len(groups) == len(x) == len(y)):
        raise ValueError("kernel_distance with groups: x, y and groups need the same length (paired rows)")
    keep = groups[:, None] != groups[None, :]
    return float((kxx[keep].mean() + kyy[keep].mean() - 2 * kxy[keep].mean()))


def auc(labels, scores):
    """Area under the ROC curve (Mann-Whitney U with tied scores counted half)."""
    from scipy.stats import rankdata
    labels = np.asarray(labels, bool)
    r = rankdata(scores)
    n1, n0 = labels.sum(), (~labels).sum()
    return float((r[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def classifier_auc(true_feats, gen_feats, cond=None, seed=0, max_epochs=300, patience=40, hidden=64, record=None):
    """Classifier two-sample test on high-level features. An MLP (2 hidden layers of `hidden`, ReLU) learns to
    tell generated from true responses on half of the events (the same events' particles on both sides), with
    early stopping on a fifth of that half; returns the AUC on the other half: 0.5 = indistinguishable, 1 =
    always told apart. Inputs: standardized_features (x ref = true) and, when given, the particle's 9
    standardised features `cond`, so a good shower at the wrong place for its particle is caught.
    Why an MLP on features and not a CNN on images: every --eval fits it 3 x reps times (model, floor, lookup)
    and this takes 2-6 s on one CPU thread for 2,000 + 2,000 responses; and on that sample size adding the
    2x2-summed log1p image (484 inputs on ZN) made the MLP overfit within 3-6 epochs and lowered the AUC of
    showers moved by 3 fibres from 0.82 to 0.76 (measured on the toy ZN test set), while the features keep the
    shape (width, brightest pixel, lit pixels catch a blur: AUC 0.99 for a 5x5 box blur).
    record: a dict that receives the held-out events' positions ("events", the same for true and generated) and
    the classifier's scores on them ("true", "gen"), for a bootstrap of the AUC over test particles."""
    zt, zg = standardized_features(true_feats, true_feats), standardized_features(gen_feats, true_feats)
    if cond is not None:
        cond = np.asarray(cond, np.float64)[:len(zt)]
        zt, zg = np.c_[zt, cond], np.c_[zg, cond[:len(zg)]]
    n = min(len(zt), len(zg))
    perm = np.random.default_rng(seed).permutation(n)          # the same events on both sides of each part
    test, fit = perm[: n // 2], perm[n // 2:]
    val, fit = fit[: len(fit) // 5], fit[len(fit) // 5:]

    def part(ix):
        return (torch.from_numpy(np.r_[zt[ix], zg[ix]]).float(),
                torch.from_numpy(np.r_[np.zeros(len(ix)), np.ones(len(ix))]).float())
    (xf, yf), (xv, yv), (xs, ys) = part(fit), part(val), part(test)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                     # a tiny MLP: one thread is fastest and never oversubscribes
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            net = nn.Sequential(nn.Linear(xf.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                nn.Linear(hidden, 1))
            opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
            best, best_epoch, state = float("inf"), 0, None
            for epoch in range(max_epochs):
                for b in torch.randperm(len(xf)).split(128):
                    loss = F.binary_cross_entropy_with_logits(net(xf[b])[:, 0], yf[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                with torch.no_grad():
                    v = F.binary_cross_entropy_with_logits(net(xv)[:, 0], yv).item()
                if v < best:
                    best, best_epoch, state = v, epoch, {k: t.clone() for k, t in net.state_dict().items()}
                elif epoch - best_epoch >= patience:
                    break
            net.load_state_dict(state)
            with torch.no_grad():
                s = net(xs)[:, 0].numpy()
            if record is not None:
                record.update(events=test, true=s[:len(test)].astype(np.float32), gen=s[len(test):].astype(np.float32))
            return auc(ys.numpy(), s)
    finally:
        torch.set_num_threads(threads)


def shower_scores(true, gen, cond=None, seed=0, groups=None, record=None):
    """The shower metrics of one repetition, on raw counts of the first SHOWER_N events: separation power per
    feature (sep_<feature>) and its mean (separation), FPD and KPD on standardized_features, classifier AUC.
    true and gen are paired row by row (the same particle): KPD leaves out the pairs of rows that share a particle
    (`groups`: the condition ids; default: row i shares only with row i). record: see classifier_auc."""
    ft, fg = shower_features(as_counts(true)[:SHOWER_N]), shower_features(as_counts(gen)[:SHOWER_N])
    cond = None if cond is None else np.asarray(cond)[:SHOWER_N]
    sep = separation_power(ft, fg)
    zt, zg = standardized_features(ft, ft), standardized_features(fg, ft)
    groups = np.arange(len(zt)) if groups is None else np.asarray(groups)[:len(zt)]
    out = dict(separation=float(sep.mean()), fpd=frechet_distance(zt, zg), kpd=kernel_distance(zt, zg, groups),
               auc=classifier_auc(ft, fg, cond, seed, record=record))
    out.update({f"sep_{name}": float(s) for name, s in zip(FEATURES, sep)})
    return out


# ----------------------------------------------------------------------------------------------------------
# Protocol: model, floor and lookup rows
# ----------------------------------------------------------------------------------------------------------
def test_part(split, max_test=None, part="test", typed=False):
    """(indices into the data set, true counts, standardised conditions) of the evaluated test events:
    the first `max_test` of the (already shuffled) test split, a fixed subset. typed: the conditions carry the
    particle-type index as a 10th column (data.with_type), for models with a type embedding."""
    idx = split.idx[part][:max_test]
    cond = data.standardize(split.ds.features[idx], split.mean, split.std)
    return idx, split.ds.images[idx], data.with_type(cond, split.ds.particles[idx]) if typed else cond


def default_batch_size(generate=None):
    """Generation batch for evaluate(): 256 on a CPU (the pixel samplers run ~2x faster per sample there than at
    1,024: flow_matching 8.2 vs 17.4 ms, ddpm 40-42 vs 87-99, issue 36; results/eval_batch_cpu.json: 1.2-2.4x for
    9 of the 10 scripts; vqgan's KV-cached prior gains a little from larger batches, 0.93x at 1,024 and 0.84x at
    2,048 over 3 repeats, results/eval_batch_cpu_vqgan.json: under 10 s per eval, so no exception), 1,024 on
    CUDA (the earlier default; a GPU is not slower with the larger batch). The device: the generator's `device`
    attribute when it has one, else CUDA when available (the scripts' --device auto)."""
    dev = getattr(generate, "device", None)
    cuda = str(dev).startswith("cuda") if dev is not None else torch.cuda.is_available()
    return 1024 if cuda else 256


def _collect(record, reps_records):
    """Stack per-repetition records (score(record=...)) into one: sums (reps, n, 5) float32, auc: list, and with
    the shower metrics the shower features: feats (reps, n_shower, 12), true_feats (n_shower, 12)."""
    if record is not None:
        record["sums"] = np.stack([r["sums"] for r in reps_records])
        record["auc"] = [r.get("auc") for r in reps_records]
        if all("feats" in r for r in reps_records):
            record["feats"] = np.stack([r["feats"] for r in reps_records])
            record["true_feats"] = reps_records[0]["true_feats"]


@torch.no_grad()
def evaluate(generate, split, reps=5, seed=0, max_test=None, batch_size=None, part="test", progress=True,
             keep=False, shower=True, record=None, channels="even"):
    """Score `generate(cond (n, 9) float32 standardised, generator) -> raw counts (n, H, W)` on the test
    conditions, `reps` times with generator seeds seed, seed+1, ... Returns summarize() of the scores, and
    with keep=True also the generated responses of the first repetition (float32). shower=False skips the
    shower metrics (sweeps, where only W and time are compared). batch_size: default_batch_size(generate).
    record: a dict that receives the per-event channel sums of every repetition ("sums", (reps, n, 5) float32),
    the classifier's held-out scores ("auc") and the seeds, for the bootstrap (run_eval)."""
    batch_size = batch_size or default_batch_size(generate)
    idx, true, cond = test_part(split, max_test, part, getattr(generate, "typed", False))
    cid, pdg = split.ds.cond_id[idx], split.ds.particles[idx, 9]
    scores, kept, recs = [], None, []
    bar = tqdm(total=reps * len(idx), desc="evaluate", unit="sample", disable=not progress, leave=False)
    for r in range(reps):
        g = torch.Generator().manual_seed(seed + r)
        out = []
        for i in range(0, len(idx), batch_size):
            out.append(as_counts(generate(cond[i:i + batch_size], g)))
            bar.update(len(out[-1]))
        gen = np.concatenate(out)
        kept = gen.astype(np.float32) if keep and kept is None else kept
        recs.append({})
        scores.append(score(true, gen, cid, pdg, cond[:, :9].numpy(), shower, seed=r, record=recs[-1],
                            channels=channels))
        bar.set_postfix(W=f"{scores[-1]['W']:.3f}")
    bar.close()
    _collect(record, recs)
    if record is not None:
        record["seeds"] = [seed + r for r in range(reps)]
    return (summarize(scores), kept) if keep else summarize(scores)


PROTOCOLS = data.W_PROTOCOLS
N_BOOT = 200                                 # bootstrap draws over test particles


def weighted_auc(events, s_true, s_gen, weights):
    """(B,) AUC of a classifier's held-out scores under bootstrap weights: `events` (k,) positions of the held-out
    events, s_true / s_gen (k,) their true and generated responses' scores, weights (B, n) per test event (the
    same weight for an event's true and generated response). Ties count half; unit weights give auc()."""
    w = np.asarray(weights, np.float64)[:, events]
    vals = np.r_[s_true, s_gen].astype(np.float64)
    order = np.argsort(vals, kind="stable")
    sv = vals[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sv)) + 1]               # tie groups of the sorted scores
    k = len(events)
    wt = np.c_[w, np.zeros_like(w)][:, order]                        # true responses' weights, sorted
    wg = np.c_[np.zeros_like(w), w][:, order]                        # generated responses' weights
    T, G = np.add.reduceat(wt, starts, axis=1), np.add.reduceat(wg, starts, axis=1)
    below = np.cumsum(T, 1) - T
    tot = w.sum(1)
    return ((G * (below + 0.5 * T)).sum(1) / (tot * tot)) if k else np.full(len(w), np.nan)


SHOWER_BOOT = ("separation", "fpd", "kpd")     # the shower metrics with a bootstrap interval (boot_shower)


def boot_shower(true_feats, gen_feats, groups, weights, bins=30):
    """The shower metrics of one row under bootstrap weights: {"separation", "fpd", "kpd": (B,)}, each the mean over
    the repetitions, from true features (n, F) and generated ones (reps, n, F) of the first n test events
    (shower_features), event i of every repetition weighted like true event i (weights (B, n): paired, as in
    weighted_wasserstein). The transforms of the point estimate are held fixed: the separation bins are the
    unweighted true quantiles, the standardisation the unweighted true mean and std. KPD leaves out the pairs of
    events that share a particle (`groups` (n,), as kernel_distance). Unit weights give shower_scores' values."""
    from scipy.linalg import sqrtm
    ft = np.asarray(true_feats, np.float64)
    W = np.atleast_2d(np.asarray(weights, np.float64))
    tot = W.sum(1)
    zt = standardized_features(ft, ft)
    d = zt.shape[1]
    groups = np.asarray(groups)
    keep = (groups[:, None] != groups[None, :]).astype(np.float64)
    den = ((W @ keep) * W).sum(1)

    def kernel_mean(a, b):                     # (B,) weighted mean of the kernel over pairs of different particles
        k = a @ b.T / d + 1
        k = k * k * k * k if KPD_DEGREE == 4 else k ** KPD_DEGREE    # products: ~4x faster than ** 4 here
        return ((W @ (k * keep)) * W).sum(1) / den

    def moments(z):                            # (B, d) weighted means, (B, d, d) weighted covariances (ddof 1)
        mu = W @ z / tot[:, None]
        second = np.einsum("bi,ij,ik->bjk", W, z, z, optimize=True)
        return mu, (second - tot[:, None, None] * mu[:, :, None] * mu[:, None, :]) / (tot - 1)[:, None, None]

    edges = [separation_bins(ft[:, k], bins) for k in range(ft.shape[1])]

    def hist(f, k):                            # (B, bins + 2) weighted, normalised histogram of feature k
        onehot = np.zeros((len(f), len(edges[k]) - 1))
        onehot[np.arange(len(f)), np.searchsorted(edges[k], f[:, k], "right") - 1] = 1
        return W @ onehot / tot[:, None]

    kxx = kernel_mean(zt, zt)
    mt, ct = moments(zt)
    pt = [hist(ft, k) for k in range(ft.shape[1])]
    out = {key: np.zeros(len(W)) for key in SHOWER_BOOT}
    gen_feats = np.asarray(gen_feats, np.float64)
    for fg in gen_feats:
        zg = standardized_features(fg, ft)
        out["kpd"] += kxx + kernel_mean(zg, zg) - 2 * kernel_mean(zt, zg)
        mg, cg = moments(zg)
        for b in range(len(W)):
            root = sqrtm(ct[b] @ cg[b])
            root = root.real if np.iscomplexobj(root) else root
            out["fpd"][b] += max(np.sum((mt[b] - mg[b]) ** 2) + np.trace(ct[b] + cg[b] - 2 * root), 0.0)
        for k in range(ft.shape[1]):
            pq, diff = pt[k] + hist(fg, k), pt[k] - hist(fg, k)
            out["separation"] += 0.5 * np.sum(diff ** 2 / np.where(pq > 0, pq, 1), 1) / ft.shape[1]
    return {key: v / len(gen_feats) for key, v in out.items()}


def boot_rows(true_sums, cond_id, records, n_boot=N_BOOT, seed=0):
    """Bootstrap draws of every row: {row: {"W": (B,), "W_pooled": (B,), "auc": (B,) or None}} from the records
    of evaluate / floor / lookup (per-event channel sums of every repetition, classifier scores), all with the
    same weights (paired: the same resampled test particles for every row); where a record holds the shower
    features also "separation", "fpd" and "kpd" (boot_shower). Also the point values (unit weights) under
    "point_<key>"."""
    wts = condition_weights(cond_id, n_boot, seed)
    ones = np.ones((1, len(cond_id)))
    out = {}
    for name, rec in records.items():
        if rec is None:
            continue
        o = {}
        for key, pooled in (("W", False), ("W_pooled", True)):
            o[key] = weighted_wasserstein(true_sums, rec["sums"], wts, pooled)
            o["point_" + key] = float(weighted_wasserstein(true_sums, rec["sums"], ones, pooled)[0])
        aucs = [a for a in rec.get("auc") or [] if a]
        if aucs:
            o["auc"] = np.mean([weighted_auc(a["events"], a["true"], a["gen"], wts) for a in aucs], 0)
            o["point_auc"] = float(np.mean([weighted_auc(a["events"], a["true"], a["gen"], ones)[0] for a in aucs]))
        if rec.get("feats") is not None and rec.get("true_feats") is not None:
            n_s = rec["feats"].shape[1]
            sh = boot_shower(rec["true_feats"], rec["feats"], np.asarray(cond_id)[:n_s], np.r_[ones, wts][:, :n_s])
            for key, v in sh.items():
                o["point_" + key], o[key] = float(v[0]), v[1:]
        out[name] = o
    return out


def uncertainty(boot, level=0.95):
    """The JSON block of intervals from boot_rows(): per row W (mean of the repetitions), W_pooled, auc and (where
    recorded) the shower metrics separation, fpd, kpd with their bootstrap sd and 95 % interval; per row other
    than the floor W/floor (both protocols) as a ratio interval; paired differences model - lookup, model - floor,
    lookup - floor (the same keys) with an interval and whether it excludes 0."""
    out = {}
    fl = boot.get("floor")
    for name, b in boot.items():
        row = {}
        for key in ("W", "W_pooled", "auc", *SHOWER_BOOT):
            if key in b:
                p = b["point_" + key]
                row[key] = dict(value=p, sd=float(np.std(b[key], ddof=1)), ci=interval(b[key], p, level))
        if fl is not None and name != "floor":
            for key in ("W", "W_pooled"):
                p = b["point_" + key] / fl["point_" + key]
                row[f"{key}/floor"] = dict(value=p, ci=ratio_interval(b[key], fl[key], p, level))
        out[name] = row
    pairs = [("model", "lookup"), ("model", "floor"), ("lookup", "floor")]
    pairs += [("model", k) for k in boot if k not in ("model", "floor", "lookup")]     # run_eval's others
    for a, c in pairs:
        if a in boot and c in boot:
            d = {}
            for key in ("W", "W_pooled", "auc", *SHOWER_BOOT):
                if key in boot[a] and key in boot[c]:
                    p = boot[a]["point_" + key] - boot[c]["point_" + key]
                    ci = interval(boot[a][key] - boot[c][key], p, level)
                    d[key] = dict(value=p, ci=ci, excludes_zero=bool(ci[0] > 0 or ci[1] < 0))
            out[f"{a}-{c}"] = d
    return out


def save_sums(path, idx, cond_id, true_sums, records):
    """The per-event channel sums behind an eval.json, compressed: what `--compare` and the bootstrap need; with
    the shower features of the first SHOWER_N events where the records hold them (float32)."""
    arrays = dict(idx=np.asarray(idx), cond_id=np.asarray(cond_id), true=np.asarray(true_sums, np.float32))
    for name, rec in records.items():
        if rec is None:
            continue
        arrays[f"{name}_sums"] = rec["sums"].astype(np.float32)
        if rec.get("feats") is not None:         # shower features: the bootstrap of separation, FPD and KPD
            arrays[f"{name}_feats"] = np.asarray(rec["feats"], np.float32)
            arrays.setdefault("true_feats", np.asarray(rec["true_feats"], np.float32))
        aucs = rec.get("auc") or []
        if aucs and all(aucs):
            arrays[f"{name}_auc_events"] = np.stack([a["events"] for a in aucs])
            arrays[f"{name}_auc_true"] = np.stack([a["true"] for a in aucs])
            arrays[f"{name}_auc_gen"] = np.stack([a["gen"] for a in aucs])
    np.savez_compressed(path, **arrays)


def load_sums(path):
    """save_sums' file back as (idx, cond_id, true sums, {row: record})."""
    with np.load(path, allow_pickle=False) as f:
        a = {k: f[k] for k in f.files}
    records = {}
    for name in ("model", "floor", "lookup"):
        if f"{name}_sums" in a:
            rec = dict(sums=a[f"{name}_sums"])
            if f"{name}_auc_events" in a:
                rec["auc"] = [dict(events=e, true=t, gen=g) for e, t, g in
                              zip(a[f"{name}_auc_events"], a[f"{name}_auc_true"], a[f"{name}_auc_gen"])]
            if f"{name}_feats" in a and "true_feats" in a:
                rec.update(feats=a[f"{name}_feats"].astype(np.float64), true_feats=a["true_feats"].astype(np.float64))
            records[name] = rec
    return a["idx"], a["cond_id"], a["true"].astype(np.float64), records


def protocol_block(protocol, n_test, reps, n_boot, channels="even"):
    """What produced a results row, recorded in every eval.json (rows of different protocols never share a
    table). Files without it predate protocol 2 (seed spread only, cubic KPD with the same-particle bias)."""
    return dict(version=2, W=protocol, n_test=n_test, reps=reps, channels=channels,
                bootstrap=dict(draws=n_boot, resample="test particles (all events of a drawn particle)",
                               interval="95 %, normal with the bootstrap sd, centred on the estimate; "
                                        "ratios on the log scale"),
                kpd=f"degree-{KPD_DEGREE} polynomial kernel, same-particle pairs left out")


def run_eval(generate, split, path, args, name, extra=None, floor_fn=None, others=None):
    """The full evaluation of one model: its row beside the floor and lookup rows, printed as a table and
    written as JSON to `path` (with the command line); with args.plot, PNGs next to it. With --amp (bf16 or fp16
    autocast) the file gets an _amp suffix, so it never replaces the float32 evaluation it is compared with.
    Beside the JSON, <stem>.sums.npz holds the per-event channel sums of every row (and the classifier's held-out
    scores), named in the JSON under "sums": `python metrics.py --compare A.json B.json` compares two models on
    the same events from them. Optional attributes of args: protocol ("mean-of-reps", the default, or "pooled":
    which W the tables use), channels ("even", the default, or "odd": channel_masks), bootstrap (draws, default 200; 0 = none), eval_batch_size (generation batch; default_batch_size).
    sdigan_joint.py scores each detector's view with two more arguments: floor_fn(split, reps, max_test, record,
    channels) replaces floor() (the joint set's re-simulation), and others {key: (label, row, record)} are further
    models scored on the same events (its --compare-ckpt models): rows of the table, under "separate" in the
    JSON, in the same bootstrap, with a paired model - key difference."""
    if getattr(args, "amp", False):
        path, name = path.with_name(f"{path.stem}_amp{path.suffix}"), f"{name} amp"
    protocol = getattr(args, "protocol", None) or "mean-of-reps"
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    n_boot = getattr(args, "bootstrap", N_BOOT)
    n_boot = N_BOOT if n_boot is None else n_boot
    channels = getattr(args, "channels", None) or "even"
    max_test = args.max_test or None
    records = {"model": {}, "floor": {}, "lookup": {}}
    others = others or {}
    if {"model", "floor", "lookup"} & set(others):
        raise ValueError(f"others: the keys model, floor and lookup are taken ({', '.join(others)})")
    t0 = time.time()
    out = evaluate(generate, split, args.reps, args.seed, max_test, keep=args.plot, record=records["model"],
                   batch_size=getattr(args, "eval_batch_size", None), channels=channels)
    row, kept = out if args.plot else (out, None)
    seconds = time.time() - t0
    fl = (floor_fn or floor)(split, args.reps, max_test, record=records["floor"], channels=channels)
    lk = lookup(split, args.reps, max_test, record=records["lookup"], channels=channels)
    records.update({key: rec for key, (_, _, rec) in others.items()})
    records = {k: v if v else None for k, v in records.items()}
    idx = split.idx["test"][:max_test]
    true_sums = channel_sums(split.ds.images[idx], channels)
    unc = uncertainty(boot_rows(true_sums, split.ds.cond_id[idx], records, n_boot)) if n_boot else None
    print(f"\n{split.ds.detector} detector, split '{split.mode}', {len(idx)} test events, {args.reps} repetitions "
          f"({seconds / args.reps / len(idx) * 1e3:.3f} ms per sample including metrics)")
    seps = {label: dict(r, key=key) for key, (label, r, _) in others.items()}
    fl_name = "floor (joint re-sim)" if floor_fn else "floor (re-simulation)"
    print(table({name: row, **seps, fl_name: fl, "lookup (nearest train)": lk}, fl))
    if unc:
        print(uncertainty_text(unc, name))
    sums = path.with_suffix(".sums.npz")
    result = dict(name=name, model=row, floor=fl, lookup=lk, W_over_floor=row["W"][0] / fl["W"][0] if fl else None,
                  detector=split.ds.detector, data=split.ds.source, split=split.mode, n_test=len(idx),
                  reps=args.reps, n_shower=min(len(idx), SHOWER_N), seconds=seconds, command=" ".join(sys.argv),
                  amp=bool(getattr(args, "amp", False)),
                  protocol=protocol_block(protocol, len(idx), args.reps, n_boot, channels), uncertainty=unc,
                  sums=sums.name, **({"separate": seps} if others else {}),
                  **(extra or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_sums(sums, idx, split.ds.cond_id[idx], true_sums, records)
    path.write_text(json.dumps(result, indent=1))
    print(f"written {path} and {sums}")
    if args.plot:
        true = split.ds.images[idx]
        plot_grid(true, kept, path.with_suffix(".grid.png"), 8, title=f"{name}: test responses vs generated")
        plot_histograms(true, kept, path.with_suffix(".hist.png"), title=f"{name}: channel sums, {split.mode} split")
        if "auc" in row:
            plot_features(true, kept, path.with_suffix(".features.png"), title=f"{name}: shower features, {split.mode} split")
        print(f"plots: {path.with_suffix('.grid.png')}, {path.with_suffix('.hist.png')}, {path.with_suffix('.features.png')}")
        plot_run_curve(path, name)
    return result


def uncertainty_text(unc, name="model"):
    """The printed form of uncertainty(): intervals of W (both protocols), W / floor, AUC and the shower metrics,
    and the paired model - lookup differences."""
    lines = ["", f"95 % intervals, bootstrap over test particles ({'paired: the same resampled events for every row'})"]
    others = [k for k in unc if "-" not in k and k not in ("model", "floor", "lookup")]
    for row in ("model", *others, "floor", "lookup"):
        u = unc.get(row)
        if not u:
            continue
        parts = []
        for key, label in (("W", "W mean of reps"), ("W_pooled", "W pooled"), ("W/floor", "W/floor"),
                           ("W_pooled/floor", "pooled W/floor"), ("auc", "AUC"), ("separation", "separation"),
                           ("fpd", "FPD"), ("kpd", "KPD")):
            if key in u:
                v, f = u[key], ".4f" if key == "kpd" else ".3f"
                parts.append(f"{label} {v['value']:{f}} [{v['ci'][0]:{f}}, {v['ci'][1]:{f}}]")
        lines.append(f"  {name if row == 'model' else row:<20} " + "; ".join(parts))
    for pair in ("model-lookup", "model-floor", *(f"model-{k}" for k in others)):
        for key, v in (unc.get(pair) or {}).items():
            f = "+.4f" if key == "kpd" else "+.3f"
            lines.append(f"  {pair.replace('model', name)} {key}: {v['value']:{f}} [{v['ci'][0]:{f}}, "
                         f"{v['ci'][1]:{f}}] " + ("excludes 0" if v["excludes_zero"] else "includes 0: not resolved"))
    return "\n".join(lines)


def floor(split, reps=5, max_test=None, part="test", shower=True, record=None, channels="even", simulate=None):
    """The noise floor: independent toy re-simulations of the test conditions, repetition r with simulator seed
    10,000 + r. None for real data. record: as in evaluate(). simulate(particles, seed) -> (counts, below cut):
    another re-simulation (sdigan_joint.py: the joint set's, one detector's responses); default data.resimulate."""
    if simulate is None:
        if not split.ds.is_toy:
            return None
        simulate = lambda p, seed: data.resimulate(p, split.ds.detector, seed, split.ds.cut)   # noqa: E731
    idx, true, cond = test_part(split, max_test, part)
    cid, pdg = split.ds.cond_id[idx], split.ds.particles[idx, 9]
    scores, recs = [], []
    for r in range(reps):
        sim, below = simulate(split.ds.particles[idx], 10_000 + r)
        recs.append({})
        scores.append(dict(score(true, sim, cid, pdg, cond.numpy(), shower, seed=r, record=recs[-1],
                                 channels=channels), below_cut=below))
    _collect(record, recs)
    if record is not None:
        record["seeds"] = [10_000 + r for r in range(reps)]
    return summarize(scores)


def lookup_picks(split, reps=5, max_test=None, part="test"):
    """(reps, n) indices into the data set of the lookup's responses: for each test event, a random training
    response of the nearest training condition (standardised features), drawn afresh in every repetition."""
    idx, _, cond = test_part(split, max_test, part)
    train = split.idx["train"]
    tc = split.ds.cond_id[train]
    uniq, first = np.unique(tc, return_index=True)
    tree = cKDTree(split.cond("train").numpy()[first])
    _, nearest = tree.query(cond.numpy())
    order = np.argsort(tc, kind="stable")
    start = np.searchsorted(tc[order], uniq)
    count = np.bincount(np.searchsorted(uniq, tc), minlength=len(uniq))
    return np.stack([train[order[start[nearest] + (np.random.default_rng([20_000, r]).random(len(idx))
                                                   * count[nearest]).astype(int)]] for r in range(reps)])


def lookup(split, reps=5, max_test=None, part="test", shower=True, record=None, channels="even"):
    """Lookup baseline: a random training response of the nearest training condition (lookup_picks)."""
    idx, true, cond = test_part(split, max_test, part)
    cid, pdg = split.ds.cond_id[idx], split.ds.particles[idx, 9]
    scores, recs = [], []
    for r, pick in enumerate(lookup_picks(split, reps, max_test, part)):
        recs.append({})
        scores.append(score(true, split.ds.images[pick], cid, pdg, cond.numpy(), shower, seed=r, record=recs[-1],
                            channels=channels))
    _collect(record, recs)
    return summarize(scores)


def table(rows, floor_row=None):
    """A printable results table. rows: {name: summarize() dict or None}."""
    fw = floor_row["W"][0] if floor_row else None
    head = f"{'':<22}{'W':>16}{'W/floor':>9}{'MAE':>10}{'RMSE':>8}{'empty':>7}{'div err':>9}   W per channel 1-5"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        if r is None:
            lines.append(f"{name:<22}{'n/a (real data: no simulator)':>40}")
            continue
        ratio = f"{r['W'][0] / fw:.2f}" if fw else "n/a"
        chans = " ".join(f"{r[f'W_ch{i}'][0]:.2f}" for i in range(1, 6))
        lines.append(f"{name:<22}{r['W'][0]:>9.3f} ±{r['W'][1]:<5.3f}{ratio:>9}{r['MAE'][0]:>10.2f}"
                     f"{r['RMSE'][0]:>8.3f}{r['empty'][0]:>7.3f}{r['div_err'][0]:>9.3f}   {chans}")
    shower = {name: r for name, r in rows.items() if r is not None and "auc" in r}
    if shower:
        head = (f"\n{'shower metrics':<22}{'separation':>16}{'FPD':>16}{'KPD':>18}{'classifier AUC':>18}"
                f"   worst-separated features")
        lines += [head, "-" * (len(head) - 1)]
        for name, r in shower.items():
            worst = sorted(FEATURES, key=lambda f: -r[f"sep_{f}"][0])[:3]
            lines.append(f"{name:<22}{r['separation'][0]:>9.3f} ±{r['separation'][1]:<5.3f}{r['fpd'][0]:>9.3f} "
                         f"±{r['fpd'][1]:<5.3f}{r['kpd'][0]:>10.4f} ±{r['kpd'][1]:<6.4f}{r['auc'][0]:>11.3f} "
                         f"±{r['auc'][1]:<5.3f}   " + ", ".join(f"{f} {r[f'sep_{f}'][0]:.2f}" for f in worst))
    return "\n".join(lines)


def time_per_sample(generate, cond, batch=256, repeats=3):
    """Median wall time (ms) per generated sample on one batch, after a warm-up call; the result is
    copied back to the host inside the timed region, so asynchronous devices are synchronised."""
    c = cond[:batch]
    g = torch.Generator().manual_seed(0)
    as_counts(generate(c, g))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        as_counts(generate(c, g))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)) / len(c)


def run_sweep(make_generate, settings, split, path, args, name, cost_keys=None):
    """Quality vs speed: for each setting (a dict of sampler options, e.g. steps and solver), the
    Wasserstein over args.reps repetitions and the ms per sample at batch 256. Table on screen, JSON at path.
    cost_keys: the setting keys that decide the cost (e.g. steps, not eta): settings that agree on them are
    timed once."""
    max_test = args.max_test or None
    _, _, cond = test_part(split, max_test)
    fl = floor(split, args.reps, max_test, shower=False)
    rows, timed = [], {}
    print(f"\n{name}: {split.ds.detector}, split '{split.mode}', {len(cond)} test events, {args.reps} repetitions; "
          + (f"floor W {fl['W'][0]:.3f}" if fl else "no floor (real data)"))
    print(f"{'setting':<28}{'W':>16}{'W/floor':>9}{'MAE':>9}{'ms/sample':>11}")
    for s in settings:
        gen = make_generate(**s)
        r = evaluate(gen, split, args.reps, args.seed, max_test, progress=False, shower=False)
        key = tuple(s[k] for k in cost_keys) if cost_keys else tuple(s.items())
        if key not in timed:
            timed[key] = time_per_sample(gen, cond)
        ms = timed[key]
        rows.append(dict(s, W=r["W"], MAE=r["MAE"], ms_per_sample=ms))
        label = " ".join(f"{k} {v}" for k, v in s.items())
        ratio = f"{r['W'][0] / fl['W'][0]:.2f}" if fl else "n/a"
        print(f"{label:<28}{r['W'][0]:>9.3f} ±{r['W'][1]:<5.3f}{ratio:>9}{r['MAE'][0]:>9.2f}{ms:>11.3f}")
    result = dict(rows=rows, floor=fl, detector=split.ds.detector, split=split.mode, n_test=len(cond), reps=args.reps,
                  batch=256, threads=torch.get_num_threads(), command=" ".join(sys.argv))
    path.write_text(json.dumps(result, indent=1))
    print(f"written {path}")
    return result


# ----------------------------------------------------------------------------------------------------------
# Plots (matplotlib is imported only here)
# ----------------------------------------------------------------------------------------------------------
def plot_sweep(result, path, x="steps", group=None, xlabel=None):
    """A run_sweep result as two log-log panels: Wasserstein and ms per sample against setting `x`, one line per
    value of setting `group`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({r.get(group) for r in result["rows"]}, key=str):
        rows = [r for r in result["rows"] if r.get(group) == key]
        xs, label = [r[x] for r in rows], f"{group} {key}" if group else None
        a.errorbar(xs, [r["W"][0] for r in rows], [r["W"][1] for r in rows], marker="o", capsize=3, label=label)
        b.plot(xs, [r["ms_per_sample"] for r in rows], marker="o", label=label)
    if result["floor"]:
        a.axhline(result["floor"]["W"][0], color="gray", ls="--", label="noise floor")
    a.set(ylabel="Wasserstein", title=f"{result['detector']}, {result['split']} split, {result['n_test']} test events")
    b.set(ylabel=f"ms / sample (batch {result['batch']})", title=f"CPU threads: {result['threads']}")
    for ax in (a, b):
        ax.set(xscale="log", yscale="log", xlabel=xlabel or x)
        ax.set_xticks(xs, [str(s) for s in xs]), ax.set_xticks([], minor=True), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_curve(run):
    """The validation rows of a training run: its metrics.jsonl (a run folder or the file itself) as a list of
    dicts with 'step' and 'val_W...' keys; a clear error when there is none."""
    f = Path(run)
    f = f / "metrics.jsonl" if f.is_dir() else f
    if not f.is_file():
        raise FileNotFoundError(f"no training log at {f} (every script writes metrics.jsonl next to its ckpt.pt)")
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step" in r and any(k.startswith("val_W") for k in r)]
    if not rows:
        raise ValueError(f"{f}: no validation rows with a val_W entry")
    return rows


def plot_run_curve(path, name):
    """--eval --plot: the validation W of the training run beside the eval file `path` (its metrics.jsonl, when
    evaluating in the run's folder) into <path>.curve.png."""
    log = path.parent / "metrics.jsonl"
    try:
        plot_curve([log], path.with_suffix(".curve.png"), [name], f"{name}: validation W during training")
        print(f"training curve: {path.with_suffix('.curve.png')}")
    except (FileNotFoundError, ValueError) as e:
        print(f"no training curve: {e}")


def plot_curve(runs, path, labels=None, title=""):
    """Validation Wasserstein (the runs' own val_W: 1000 validation events, not the test set) against optimiser
    steps, log scale, one line per run and val_W key (the joint model logs one per detector): whether a run was
    still improving when its budget ended. `runs`: run folders or metrics.jsonl files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, run in enumerate(runs):
        rows = read_curve(run)
        name = labels[i] if labels else Path(run).name if Path(run).is_dir() else Path(run).parent.name
        for key in sorted({k for r in rows for k in r if k.startswith("val_W")}):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot(*zip(*pts), marker="o", ms=3, label=name + key[len("val_W"):].replace("_", " "))
    ax.set(xlabel="optimiser step", ylabel="validation W (1000 events)", yscale="log", title=title)
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_histograms(true, gen, path, labels=("true", "generated"), title=""):
    """Channel-sum histograms, true vs generated, log y (as in the papers), one panel per channel + total."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    st, sg = channel_sums(true), channel_sums(gen)
    st, sg = np.c_[st, st.sum(1)], np.c_[sg, sg.sum(1)]
    fig, axes = plt.subplots(1, 6, figsize=(20, 3.4))
    for k, ax in enumerate(axes):
        hi = max(np.percentile(st[:, k], 99.9), 1.0)
        bins = np.linspace(0, hi, 60)
        for vals, lab in ((st[:, k], labels[0]), (sg[:, k], labels[1])):  # last bin: overflow
            ax.hist(np.clip(vals, 0, hi), bins, histtype="step", lw=1.5, label=lab)
        ax.set_yscale("log")
        ax.set_title(f"channel {k + 1}" if k < 5 else "photon sum")
        ax.set_xlabel("photons")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_features(true, gen, path, labels=("true", "generated"), title=""):
    """Histograms of the high-level shower features (first SHOWER_N events), true vs generated, with the
    separation power in each panel's title; the count-valued features on a log1p axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ft, fg = shower_features(as_counts(true)[:SHOWER_N]), shower_features(as_counts(gen)[:SHOWER_N])
    sep = separation_power(ft, fg)
    fig, axes = plt.subplots(2, 6, figsize=(20, 6.4))
    for k, ax in enumerate(axes.flat):
        log = k in LOG_FEATURES
        t, g = (np.log1p(ft[:, k]), np.log1p(fg[:, k])) if log else (ft[:, k], fg[:, k])
        lo, hi = np.percentile(t, 0.1), max(np.percentile(t, 99.9), np.percentile(t, 0.1) + 1e-6)
        bins = np.linspace(lo, hi, 40)
        for vals, lab in ((t, labels[0]), (g, labels[1])):   # end bins hold the under- and overflow
            ax.hist(np.clip(vals, lo, hi), bins, histtype="step", lw=1.5, density=True, label=lab)
        ax.set_title(f"{FEATURES[k]}: separation {sep[k]:.3f}", fontsize=10)
        ax.set_xlabel(f"log1p({FEATURES[k]})" if log else FEATURES[k] + (" (fibres)" if "_" in FEATURES[k] else ""))
    axes.flat[0].legend()
    fig.suptitle(f"{title} (mean separation {sep.mean():.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_grid(true, gen, path, n=8, labels=("true", "generated"), title=""):
    """Responses for the same conditions: row 1 true, row 2 generated, log colour scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    true, gen = as_counts(true)[:n], as_counts(gen)[:n]
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 4.4 * true.shape[1] / max(true.shape[2], 30)), squeeze=False)
    for j in range(n):
        vmax = np.log1p(max(true[j].max(), gen[j].max(), 1))
        for i, (img, lab) in enumerate(((true[j], labels[0]), (gen[j], labels[1]))):
            axes[i, j].imshow(np.log1p(img), vmin=0, vmax=vmax, cmap="magma")
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            axes[i, j].set_title(f"{lab} {img.sum():.0f}", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Results as data: RESULTS.md is generated from the committed eval.json files under results/
# ----------------------------------------------------------------------------------------------------------
def protocol_label(r):
    """One line naming the protocol that produced an eval.json; rows with different labels are never compared in
    one table."""
    p = r.get("protocol")
    if not p:
        return ("protocol 1 (before issue 36): ± = std over the seeds on one fixed set of test events (test-set noise "
                "left out), W = mean of the repetitions, KPD with the cubic kernel and the same-particle bias "
                "(the floor below 0)")
    odd = p.get("channels", "even") == "odd"
    return (f"protocol {p['version']}: W = {'mean of the repetitions' if p['W'] == 'mean-of-reps' else 'pooled over the repetitions'}, "
            f"{p['reps']} repetitions, [95 % interval] from a bootstrap over test particles, {p['kpd']}"
            + (", channels 1-4 on the (row+col)-odd pixels (the proton paper's code)" if odd else ""))


def _w_key(r):
    """The uncertainty key of the W a protocol-2 file's tables use: "W_pooled" or "W" (mean of the repetitions)."""
    return "W_pooled" if (r.get("protocol") or {}).get("W") == "pooled" else "W"


def headline_W(r, row="model"):
    """The W a file's protocol reports for `row` (mean of the repetitions, or pooled)."""
    u = r.get("uncertainty") or {}
    if _w_key(r) == "W_pooled" and row in u:
        return u[row]["W_pooled"]["value"]
    return r[row]["W"][0]


def _ci(r, row, key, fmt=".3f"):
    """'value [lo, hi]' of a protocol-2 file's uncertainty block; '-' when it has none."""
    u = ((r.get("uncertainty") or {}).get(row) or {}).get(key)
    return f"{u['value']:{fmt}} [{u['ci'][0]:{fmt}}, {u['ci'][1]:{fmt}}]" if u else "-"


def _pm(r, key, fmt=".3f"):
    return f"{r[key][0]:{fmt}} ± {r[key][1]:{fmt}}" if r and key in r else "-"


def results_markdown(folder):
    """The results tables (markdown) of every eval.json in `folder` (files named <script>_<detector>_<split>.json,
    as `--eval` writes them): one table per detector, split and number of test events, floor and lookup first,
    models by W. Typed numbers cannot creep in: tests/test_results.py regenerates it and compares."""
    runs = []
    for path in sorted(Path(folder).glob("*.json")):
        r = json.loads(path.read_text())
        if {"floor", "lookup", "detector", "split", "n_test"} <= set(r) and ("model" in r or r.get("kind") == "reference"):
            runs.append((path.name, r))
    dest = "RESULTS.md" if Path(folder).name == "results" else f"{Path(folder).as_posix()}/README.md"   # variants
    link = f"{folder.rstrip('/')}/" if dest == "RESULTS.md" else ""            # links relative to the written file
    lines = ["# Results", "",
             f"Generated by `python metrics.py --results {folder} > {dest}` from the eval.json files in `{folder}` "
             "(each written by a script's `--eval`, its command line inside); do not edit by hand.",
             "W: channel-sum Wasserstein (the papers' metric), mean ± std over the repetitions; W/floor against an "
             "independent toy re-simulation of the same particles; shower metrics (metrics.py's docstring) on the "
             "first 2,000 test events: separation power (0 = same feature histograms), FPD, KPD, classifier AUC "
             "(0.5 = indistinguishable). Rows compare only within one table (same test events, same protocol).",
             "The classifier AUC is the only metric here that checks conditioning (true showers given to the wrong "
             "particles score separation 0 and FPD 0 but AUC 0.84) and it is weak by design: its MLP trains on 800 + "
             "800 events, so an 8 % gain error still scores 0.516; AUC gaps under ~0.02 are noise.", ""]
    groups = {}
    for name, r in runs:
        groups.setdefault((r["detector"], r["split"], r["n_test"], r.get("data", ""), protocol_label(r)), []).append((name, r))
    for (det, split, n, src, label), group in sorted(groups.items(), key=lambda g: (g[0][4][:10] != "protocol 2",) + g[0]):
        ref = group[0][1]
        new = bool(ref.get("protocol"))
        fw = headline_W(ref, "floor") if ref["floor"] else None
        lines += [f"## {det}, {split} split, {n:,} test events" + (f", data {src}" if src != "toy(seed=0)" else "")
                  + ("" if new else ", protocol 1"), "", label + ".", ""]
        if new:
            lines += ["| row | W | W / floor | MAE | empty | separation | FPD | KPD | AUC | parameters | file |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
        else:
            lines += ["| row | W | W / floor | MAE | empty | separation | FPD | KPD (biased) | AUC | parameters | file |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]

        seeds_only = []                         # rows whose shower metrics have no test-set interval

        def row(label, r, params="", file="", f=None, key=None):
            if new and f is not None:
                wk = _w_key(f)
                w, ratio, auc_ = _ci(f, key, wk), _ci(f, key, wk + "/floor", ".2f"), _ci(f, key, "auc")
                ratio = "1.00" if key == "floor" else ratio
            else:
                w, auc_ = _pm(r, "W"), _pm(r, "auc")
                ratio = f"{r['W'][0] / fw:.2f}" if r and fw else "-"
            mae, empty = (f"{r['MAE'][0]:.1f}", f"{r['empty'][0]:.2f}") if r else ("-", "-")
            u = ((f or {}).get("uncertainty") or {}).get(key) or {} if new else {}
            shower = [_ci(f, key, k, fmt) if k in u else _pm(r, k, fmt)
                      for k, fmt in (("separation", ".3f"), ("fpd", ".3f"), ("kpd", ".4f"))]
            seeds_only.append(bool(new and r and "kpd" in r and "kpd" not in u))
            lines.append(f"| {label} | {w} | {ratio} | {mae} | {empty} | {' | '.join(shower)} | {auc_} | {params} | {file} |")
        row("noise floor (re-simulation)", ref["floor"], f=ref, key="floor")
        row("lookup (nearest training particle)", ref["lookup"], f=ref, key="lookup")
        for name, r in sorted((g for g in group if "model" in g[1]), key=lambda g: headline_W(g[1])):
            params = f"{r['n_params']:,}" if isinstance(r.get("n_params"), int) else ""
            row(r.get("name", name[:-5]), r["model"], params, f"[{name}]({link}{name})", f=r, key="model")
            for label, sep in (r.get("separate") or {}).items():    # sdigan_joint --compare-ckpt: same test events
                seen = sep.get("seen_in_training", [None])[0]
                unc_key = sep.get("key") if sep.get("key") in (r.get("uncertainty") or {}) else None
                row(label + (f", {100 * seen:.0f} % of these particles seen in training" if seen is not None else ""),
                    sep, "", f"[{name}]({link}{name})", f=r if unc_key else None, key=unc_key)
        if new:
            lines.append("")
            if any(seeds_only):
                lines += ["Separation, FPD and KPD written as value ± std: the spread over the repetitions alone, "
                          "test-set noise left out (the eval.json predates the shower features in its .sums.npz; "
                          "rerun its --eval for the bootstrap interval); do not rank rows on those cells.", ""]
        for name, r in group:                   # paired differences on the same events (protocol 2)
            pairs = ("model-lookup", "model-floor") if "model" in r else ("lookup-floor",)
            pairs += tuple(f"model-{sep['key']}" for sep in (r.get("separate") or {}).values() if "key" in sep)
            for pair, d in ((k, v) for k, v in (r.get("uncertainty") or {}).items() if k in pairs):
                lines.append(f"- {pair.replace('model', r.get('name', name[:-5]))}, paired on the same events: " + "; ".join(
                    f"{k} {v['value']:{f}} [{v['ci'][0]:{f}}, {v['ci'][1]:{f}}]"
                    + ("" if v["excludes_zero"] else " (includes 0)")
                    for k, v in d.items() for f in ["+.4f" if k == "kpd" else "+.3f"]))
        lines += ["", "Commands:", ""] + [f"- `{name}`: `{r['command']}`" for name, r in group] + [""]
        for name, r in group:                   # property control (corrvae.py): requested vs achieved
            if r.get("control"):
                lines += [f"Control accuracy of {r.get('name', name[:-5])} ({r.get('n_control', '?')} test particles, "
                          "each property requested alone; unsteered = the same particles sampled without a request):",
                          "", "| property | Spearman | MAE | unsteered Spearman | unsteered MAE |", "|---|---|---|---|---|"]
                lines += [f"| {k} | {c['rho']:.3f} | {c['mae']:.2f} | {c['rho_free']:.3f} | {c['mae_free']:.2f} |"
                          for k, c in r["control"].items()] + [""]
    if not runs:
        lines.append("(no eval.json files yet)")
    return "\n".join(lines) + "\n"


def sweep_markdown(paths):
    """The quality-vs-speed tables (markdown) of run_sweep JSON files (a script's `--eval --sweep`): one per file,
    one row per setting, NFE (network calls per sample) where the setting names a solver."""
    lines = []
    for path in paths:
        r = json.loads(Path(path).read_text())
        if "rows" not in r or not r["rows"]:
            raise ValueError(f"{path}: not a sweep.json (no rows)")
        keys = [k for k in r["rows"][0] if k not in ("W", "MAE", "ms_per_sample")]
        fw = r["floor"]["W"][0] if r.get("floor") else None
        lines += [f"`{path}`: {r['detector']}, {r['split']} split, {r['n_test']:,} test events, {r['reps']} repetitions, "
                  f"batch {r['batch']}, {r['threads']} threads; `python {r['command']}`", "",
                  "| " + " | ".join(keys) + " | NFE | W | W / floor | MAE | ms / sample |",
                  "|" + "---|" * (len(keys) + 5)]
        for row in r["rows"]:
            nfe = row["steps"] * (2 if row.get("solver") == "midpoint" else 1) if "steps" in row else "-"
            ratio = f"{row['W'][0] / fw:.2f}" if fw else "n/a"
            lines.append("| " + " | ".join(str(row[k]) for k in keys) + f" | {nfe} | {row['W'][0]:.2f} ± {row['W'][1]:.2f}"
                         f" | {ratio} | {row['MAE'][0]:.2f} | {row['ms_per_sample']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def results_summary(folder):
    """The README's summary table (markdown): one row per model script with ZN results (file names
    <script>_neutron_<split>.json), W / floor on the random and the condition-disjoint split, the classifier AUC
    (random split; floor ~0.5), and ms / sample from the CPU bench JSON (results/bench_cpu.json, inference rows)
    when there is one. One table per evaluation protocol (protocol_label) that has a script row (a protocol of
    variant files only gets none): rows of different protocols are never in one table. Protocol-2 cells carry
    their 95 % interval (bootstrap over test particles); the reference rows of protocol 2 may come from
    reference_neutron_<split>.json files (floor and lookup only, no model).
    Generated by `python metrics.py --results results/ --summary`."""
    folder = Path(folder)
    evals, refs = {}, {}
    for p in sorted(folder.glob("*_neutron_*.json")):     # eval.json files only (not e.g. a stage-1 check)
        r = json.loads(p.read_text())
        if {"model", "floor", "lookup", "split"} <= set(r) and p.stem.endswith(f"_neutron_{r['split']}"):
            evals[p.stem] = r
    for p in sorted(folder.glob("reference_neutron_*.json")):
        r = json.loads(p.read_text())
        if r.get("kind") == "reference":
            refs[r["split"]] = r
    bench = folder / "bench_cpu.json"
    ms = {}
    if bench.exists():
        for r in json.loads(bench.read_text())["rows"]:
            if r.get("mode") == "inference" and r.get("ms_per_sample"):
                ms.setdefault(r["model"], (r["ms_per_sample"], r["batch"]))
    by_protocol = {}
    for k, r in evals.items():
        by_protocol.setdefault(protocol_label(r), {})[k] = r
    lines = []

    def ratio(r, row="model"):
        if not (r and r.get("floor")):
            return "-"
        if r.get("protocol"):
            return _ci(r, row, _w_key(r) + "/floor", ".2f")
        return f"{r[row]['W'][0] / r['floor']['W'][0]:.2f}"

    def auc_cell(r, row="model"):
        if not r:
            return "-"
        return _ci(r, row, "auc", ".2f") if r.get("protocol") else _pm(r[row], "auc", ".2f")
    older = False                                  # a table of an older protocol is shown
    for label in sorted(by_protocol, key=lambda x: (x[:10] != "protocol 2", x)):
        group = by_protocol[label]
        scripts = sorted(k for k in {k.rsplit("_neutron_", 1)[0] for k in group}     # scripts only, not the variants
                         if (Path(__file__).parent / f"{k}.py").exists())
        if not scripts:                            # only variants (or references) of this protocol: no table
            continue
        older |= label[:10] != "protocol 2"
        if lines:
            lines.append("")
        lines += [f"{label}:", "",
                  "| model | W / floor, random | W / floor, disjoint | classifier AUC, random | ms / sample, CPU | results |",
                  "|---|---|---|---|---|---|"]
        for s_ in scripts:
            rnd, dis = group.get(f"{s_}_neutron_random"), group.get(f"{s_}_neutron_disjoint")
            t = f"{ms[s_][0]:.3f} (batch {ms[s_][1]})" if s_ in ms else "-"
            files = ", ".join(f"[{k.rsplit('_', 1)[1]}]({folder.as_posix().rstrip('/')}/{k}.json)"
                              for k in group if k.startswith(f"{s_}_neutron_"))
            lines.append(f"| `{s_}.py` | {ratio(rnd)} | {ratio(dis)} | {auc_cell(rnd)} | {t} | {files} |")
        lookup = {}                                # the lookup row: the same in every file of one split
        for k, r in group.items():
            lookup.setdefault(k.rsplit("_", 1)[1], r)
        for split, r in refs.items():
            if protocol_label(r) == label:
                lookup[split] = r
        if lookup:
            lines.append(f"| lookup (nearest training particle) | {ratio(lookup.get('random'), 'lookup')} | "
                         f"{ratio(lookup.get('disjoint'), 'lookup')} | {auc_cell(lookup.get('random'), 'lookup')} | - | |")
    if not lines:
        return ("| model | W / floor, random | W / floor, disjoint | classifier AUC, random | ms / sample, CPU | results |\n"
                "|---|---|---|---|---|---|\n")
    lines += ["", "The classifier AUC is the only metric here that checks conditioning (true showers given to the wrong "
              "particles: AUC 0.84, separation 0) and it is weak by design: 800 + 800 training events, so an 8 % gain "
              "error still scores 0.516; AUC gaps under ~0.02 are noise." + (
                  " Protocol-1 cells have no test-set interval: a ranking between them is not established until their "
                  "rows are regenerated (`--compare`)." if older else "")]
    return "\n".join(lines) + "\n"


# The thesis' Table 4.3 (arXiv 2407.16704: Wasserstein on the real neutron set, CNN / ViT), its five autoencoders:
# (row, thesis W CNN, thesis W ViT, the result files' stem: <stem>_neutron_random.json with the CNN, the same with
# _vit before _neutron for the ViT), and the command that writes each (the same flags with --arch vit for the ViT).
TABLE43 = [("VAE", 11.52, 11.90, "vae", "vae.py"),
           ("VAE + particle-type embedding", 15.93, 11.61, "vae_embedding", "vae.py --variant embedding"),
           ("supervised autoencoder", 23.71, 20.43, "vae_supervised", "vae.py --variant supervised"),
           ("AE + Sinkhorn noise generator", 26.53, 11.34, "sae_ng", "sae_ng.py"),
           ("AE + l2 noise generator", 37.56, 11.19, "sae_ng_l2", "sae_ng.py --matching l2")]


def table43(folder):
    """The thesis' Table 4.3 layout on the toy data (markdown) from the eval.json files in `folder` named as in
    TABLE43 (ZN, random split); a missing file leaves its cells as "missing". Cells: W / floor and the shower
    metrics (separation, classifier AUC); then the thesis' two comparisons, answered where both files exist."""
    folder = Path(folder)
    runs = {}
    for _, _, _, stem, _ in TABLE43:
        for arch, name in (("CNN", f"{stem}_neutron_random.json"), ("ViT", f"{stem}_vit_neutron_random.json"),
                           ("vdvae", f"{stem}_vdvae_neutron_random.json")):
            if (folder / name).exists():
                r = json.loads((folder / name).read_text())
                runs[stem, arch] = dict(r, path=folder / name) if {"model", "floor"} <= set(r) else None
    tests = {(r["n_test"], r["reps"]) for r in runs.values() if r}
    lines = ["# The thesis' Table 4.3 on the toy data", "",
             f"Generated by `python metrics.py --results {folder.as_posix()} --table43` from the files named below "
             "(ZN, random split); thesis W on the real set for reference (the MLP-Mixer column of Tables 4.3-4.4, a "
             "third backbone, is left out). W / floor: the model's Wasserstein over that of an independent "
             "re-simulation; separation (0: same shower-feature histograms) and classifier AUC (0.5: "
             "indistinguishable) on the first 2,000 test events. 'missing': no result file yet.",
             f"Test events, repetitions: {', '.join(f'{n:,}, {k}' for n, k in sorted(tests)) or '-'}"
             + (" (MIXED: cells are not comparable)" if len(tests) > 1 else "")
             + ("; MIXED protocols (issue 36): cells of different protocols are not comparable, the comparisons below "
                "say where" if len({protocol_label(r) for r in runs.values() if r}) > 1 else ""), "",
             "| model | thesis W, CNN / ViT | W / floor, CNN | W / floor, ViT | W, CNN | W, ViT | separation, CNN | "
             "separation, ViT | AUC, CNN | AUC, ViT |", "|---" * 10 + "|"]

    def cell(r, key, fmt=".3f"):
        """A protocol-2 file's cell is 'value [95 % interval]' (bootstrap over test particles); a protocol-1 file's
        is the bare ratio or 'value ± std' over the seeds, the spread that leaves out test-set noise."""
        if r is None:
            return "missing"
        u = (r.get("uncertainty") or {}).get("model") or {}
        wk = _w_key(r)
        if key == "ratio":
            if f"{wk}/floor" in u:
                return _ci(r, "model", f"{wk}/floor", ".2f")
            return f"{r['model']['W'][0] / r['floor']['W'][0]:.2f}" if r.get("floor") else "-"
        if (wk if key == "W" else key) in u:
            return _ci(r, "model", wk if key == "W" else key, fmt)
        return _pm(r["model"], key, fmt)
    for label, w_cnn, w_vit, stem, _ in TABLE43:
        c, v = runs.get((stem, "CNN")), runs.get((stem, "ViT"))
        lines.append(f"| {label} | {w_cnn:.2f} / {w_vit:.2f} | {cell(c, 'ratio')} | {cell(v, 'ratio')} | {cell(c, 'W', '.2f')} | "
                     f"{cell(v, 'W', '.2f')} | {cell(c, 'separation')} | {cell(v, 'separation')} | {cell(c, 'auc')} | "
                     f"{cell(v, 'auc')} |")

    def better(a, b, name_a, name_b):
        """Which of two result rows has the lower W: protocol 2, the paired interval of the difference on the
        same events (compare). Protocol 1 has no interval with test-set noise in it (its std is the seed spread on
        one fixed set of events, too small to rank on: issue 36), so two protocol-1 rows are not ranked; rows of
        different protocols are not compared."""
        if not (a and b):
            return "not yet measured"
        wa, wb = a["model"]["W"][0], b["model"]["W"][0]
        if protocol_label(a) != protocol_label(b):
            return f"not comparable ({wa:.2f} vs {wb:.2f}: different protocols, regenerate the older row)"
        if a.get("protocol"):
            d = compare(a["path"], b["path"])[1]["W"]
            gap = f"{wa:.2f} vs {wb:.2f}, paired difference {d['diff']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"
            return f"{name_a if wa < wb else name_b} ({gap})" if d["excludes_zero"] else f"not resolved ({gap})"
        return f"not established ({wa:.2f} vs {wb:.2f}: protocol 1, no test-set interval; regenerate both rows)"
    if any(r and r.get("protocol") for r in runs.values()):
        lines += ["", "Cells of protocol-2 files: value [95 % interval] from the bootstrap over test particles (issue "
                  "36); cells of protocol-1 files: value ± std over the seeds on one fixed set of test events, a "
                  "spread that leaves out test-set noise (too small to rank on)."]
    lines += ["", "The thesis' conclusions, here (lower W wins where the paired 95 % interval of the difference on the "
              "same events excludes 0, protocol 2 only; protocol-1 rows are not ranked, their spread leaves out "
              "test-set noise; rows of different protocols are not compared):", ""]
    for label, w_cnn, w_vit, stem, _ in TABLE43:
        lines.append(f"- {label}, ViT vs CNN (thesis: {'ViT' if w_vit < w_cnn else 'CNN'}): "
                     + better(runs.get((stem, "ViT")), runs.get((stem, "CNN")), "ViT", "CNN"))
    for arch, thesis in (("CNN", "Sinkhorn"), ("ViT", "l2")):
        lines.append(f"- {arch}, l2 vs Sinkhorn noise generator (thesis: {thesis}): "
                     + better(runs.get(("sae_ng_l2", arch)), runs.get(("sae_ng", arch)), "l2", "Sinkhorn"))
    lines += ["", "The thesis' own CNN (`--arch vdvae`: VDVAE-style bottleneck blocks, BatchNorm, average pooling; the "
              "CNN columns above are this repository's compact conv pair, `--arch cnn`):", "",
              "| model | W / floor | W | separation | AUC | ViT vs the thesis' CNN (lower W) |", "|---" * 6 + "|"]
    for label, w_cnn, w_vit, stem, _ in TABLE43:
        d = runs.get((stem, "vdvae"))
        lines.append(f"| {label} | {cell(d, 'ratio')} | {cell(d, 'W', '.2f')} | {cell(d, 'separation')} | "
                     f"{cell(d, 'auc')} | {better(runs.get((stem, 'ViT')), d, 'ViT', 'CNN')} |")
    lines += ["", "Files and the commands that write them (train, then `--eval --ckpt RUN/ckpt.pt --max-test 2000`, "
              "and copy RUN/eval.json to the file):", ""]
    for label, _, _, stem, cmd in TABLE43:
        lines.append(f"- {label}: `{stem}_neutron_random.json` (`python {cmd} --train`), "
                     f"`{stem}_vit_neutron_random.json` (`python {cmd} --arch vit --train`), "
                     f"`{stem}_vdvae_neutron_random.json` (`python {cmd} --arch vdvae --set width=64 --train`)")
    lines += ["", "`bash tools/gpu_table43.sh` (`ARCH=vdvae bash tools/gpu_table43.sh`) trains the five ViT (thesis-CNN) "
              "runs side by side on one GPU (the same commands with --device cuda; the ViT runs took ~2 min each on "
              "an H200; on 2 CPU cores a ViT step costs ~5x a CNN step)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Data statistics next to the published targets
# ----------------------------------------------------------------------------------------------------------
TARGETS = {  # DATA.md: figures from the published data sets, targets to land near
    "neutron": dict(zero=">= 0.96", sum_q="12 / 111 / 510", max_sum="~3400", max_px="~600-800",
                    E_q="~200 / 550 / 1600", mix="gamma 61, n 23, p 5, Lambda 3, K0S 2, K0L 2, pi+ 1.3",
                    diversity="Lambda/K0 ~0.7-0.8 > n ~0.4-0.6 > gamma ~0.1-0.3"),
    "proton": dict(zero="~0.99", sum_q="2 / 5 / 18", max_sum="~2300", max_px="", E_q="", mix="", diversity=""),
}
DIVERSITY_TYPES = {"gamma": [22], "n": [2112], "Lambda/K0": [3122, 310, 130]}


def per_condition_spread(ds, min_runs=20):
    """Median over conditions (with >= min_runs events) of std/mean of the photon sum, per type group."""
    total = ds.images.reshape(len(ds), -1).sum(1, dtype=np.float64)
    _, inv, cnt = np.unique(ds.cond_id, return_inverse=True, return_counts=True)
    s1, s2 = np.bincount(inv, total), np.bincount(inv, total ** 2)
    rel = np.sqrt(np.maximum(s2 / cnt - (s1 / cnt) ** 2, 0)) / np.maximum(s1 / cnt, 1e-12)
    pdg = np.zeros(len(cnt))
    pdg[inv] = ds.particles[:, 9]
    out = {}
    for name, codes in DIVERSITY_TYPES.items():
        sel = np.isin(pdg, codes) & (cnt >= min_runs)
        out[name] = float(np.median(rel[sel])) if sel.any() else float("nan")
    return out


def data_stats(ds):
    total = ds.images.reshape(len(ds), -1).sum(1, dtype=np.int64)
    nz = total[total > 0]
    codes, cnt = np.unique(ds.particles[:, 9].astype(int), return_counts=True)
    top = np.argsort(-cnt)[:8]
    return dict(
        events=len(ds), conditions=int(ds.cond_id.max() + 1), runs_per_condition=len(ds) / (ds.cond_id.max() + 1),
        zero=float(np.mean(ds.images == 0)), sum_q=np.percentile(nz, [25, 50, 75]).tolist(),
        max_sum=int(total.max()), max_px=int(ds.images.max()),
        E_q=np.percentile(ds.particles[:, 0], [25, 50, 75]).tolist(),
        E_bump=float(np.mean(ds.particles[:, 0] > 6900)), px_std=float(ds.particles[:, 4].std()),
        mix={data.PDG_NAMES.get(int(codes[i]), str(codes[i])): float(100 * cnt[i] / len(ds)) for i in top},
        diversity=per_condition_spread(ds))


def print_stats(ds, st):
    t = TARGETS[ds.detector]
    print(f"\n=== {ds.detector} calorimeter {data.SHAPES[ds.detector]}: {ds.source}")
    print(f"  events {st['events']}, distinct particles {st['conditions']} "
          f"({st['runs_per_condition']:.0f} responses each on average; real ZN set: 306,780 from 1,805)")
    rows = [("zero pixels", f"{st['zero']:.4f}", t["zero"]),
            ("photon sum quartiles (non-zero)", " / ".join(f"{q:.0f}" for q in st["sum_q"]), t["sum_q"]),
            ("max photon sum", st["max_sum"], t["max_sum"]), ("max pixel", st["max_px"], t["max_px"]),
            ("energy quartiles (GeV)", " / ".join(f"{q:.0f}" for q in st["E_q"]), t["E_q"]),
            ("fraction at the 7 TeV bump", f"{st['E_bump']:.3f}", "small"),
            ("px std (GeV)", f"{st['px_std']:.2f}", "~0.3"),
            ("particle mix (%)", ", ".join(f"{k} {v:.1f}" for k, v in st["mix"].items()), t["mix"]),
            ("per-condition std/mean of sum", ", ".join(f"{k} {v:.2f}" for k, v in st["diversity"].items()),
             t["diversity"])]
    for name, val, target in rows:
        print(f"  {name:<32} {str(val):<52} target: {target or '-'}")


def compare(path_a, path_b, n_boot=N_BOOT, protocol=None, level=0.95):
    """Paired comparison of two eval.json files on the same test events, from their .sums.npz: the bootstrap over
    test particles draws the same particles for both models (and the floor). Returns (text, dict) with, for W
    (the files' protocol, or `protocol`) and W / floor, the difference A - B, its interval and whether it
    excludes 0; the AUC difference too where both files hold the classifier's scores (same seeds, same held-out
    events), and separation, FPD and KPD where both hold the shower features."""
    files = []
    for p in (Path(path_a), Path(path_b)):
        r = json.loads(p.read_text())
        if not r.get("sums"):
            raise ValueError(f"{p}: no per-event sums (a protocol-1 eval.json, written before issue 36): rerun its --eval")
        named, beside = p.parent / r["sums"], p.with_name(p.stem + ".sums.npz")   # beside: a copied, renamed eval
        if not (beside.exists() or named.exists()):
            raise FileNotFoundError(f"{p}: its per-event sums are missing (looked for {beside} and {named})")
        sums = load_sums(beside if beside.exists() else named)
        if not sums[3].get("model"):
            raise ValueError(f"{p}: no model row (a reference file holds the floor and the lookup only); a model's "
                             "paired gaps to them are in its own eval.json, under 'uncertainty'")
        files.append((p, r, sums))
    (pa, ra, (ia, ca, ta, reca)), (pb, rb, (ib, cb, tb, recb)) = files
    if not (np.array_equal(ia, ib) and ra.get("data") == rb.get("data") and ra.get("split") == rb.get("split")
            and ra.get("detector") == rb.get("detector")):
        raise ValueError(f"{pa} and {pb} are not on the same test events (data, detector, split and indices must match)")
    if ra["protocol"].get("channels", "even") != rb["protocol"].get("channels", "even"):
        raise ValueError(f"{pa} and {pb} use different channel conventions (--channels): their W do not compare")
    protos = {ra["protocol"]["W"], rb["protocol"]["W"]}
    if protocol is None and len(protos) > 1:
        raise ValueError(f"{pa} and {pb} use different W protocols ({', '.join(sorted(protos))}): pass --protocol")
    protocol = protocol or protos.pop()
    key = "W_pooled" if protocol == "pooled" else "W"
    boot = boot_rows(ta, ca, {"a": reca["model"], "b": recb["model"], "floor": reca.get("floor")}, n_boot)
    na, nb = ra.get("name", pa.stem), rb.get("name", pb.stem)
    res = dict(a=str(pa), b=str(pb), protocol=protocol, n_test=int(len(ia)), draws=n_boot)
    d = boot["a"][key] - boot["b"][key]
    p = boot["a"]["point_" + key] - boot["b"]["point_" + key]
    res["W"] = dict(a=boot["a"]["point_" + key], b=boot["b"]["point_" + key], diff=p, ci=interval(d, p, level))
    if "floor" in boot:
        f = boot["floor"]
        dr = (boot["a"][key] - boot["b"][key]) / f[key]
        pr = p / f["point_" + key]
        res["W/floor"] = dict(a=boot["a"]["point_" + key] / f["point_" + key],
                              b=boot["b"]["point_" + key] / f["point_" + key], diff=pr, ci=interval(dr, pr, level))
    if all(k in boot[x] for k in SHOWER_BOOT for x in "ab"):      # both files hold the shower features
        for k in SHOWER_BOOT:
            pk = boot["a"]["point_" + k] - boot["b"]["point_" + k]
            res[k] = dict(a=boot["a"]["point_" + k], b=boot["b"]["point_" + k], diff=pk,
                          ci=interval(boot["a"][k] - boot["b"][k], pk, level))
    if "auc" in boot["a"] and "auc" in boot["b"]:
        same = all(np.array_equal(x["events"], y["events"]) for x, y in zip(reca["model"]["auc"], recb["model"]["auc"]))
        if same:
            pa_ = boot["a"]["point_auc"] - boot["b"]["point_auc"]
            res["auc"] = dict(a=boot["a"]["point_auc"], b=boot["b"]["point_auc"], diff=pa_,
                              ci=interval(boot["a"]["auc"] - boot["b"]["auc"], pa_, level))
    lines = [f"A: {na} ({pa})", f"B: {nb} ({pb})",
             f"{ra['detector']}, {ra['split']} split, {len(ia):,} test events, W {protocol}; {int(100 * level)} % "
             f"intervals of A - B from {n_boot} paired bootstrap draws over test particles"]
    for k, v in res.items():
        if isinstance(v, dict) and "ci" in v:
            v["excludes_zero"] = bool(v["ci"][0] > 0 or v["ci"][1] < 0)
            verdict = (f"excludes 0: {'A' if v['diff'] < 0 else 'B'} is closer to the simulation (lower {k})"
                       if v["excludes_zero"] else "includes 0: not resolved")
            f = "4f" if k == "kpd" else "3f"
            lines.append(f"  {k:<10} A {v['a']:.{f}}  B {v['b']:.{f}}  A - B {v['diff']:+.{f}} "
                         f"[{v['ci'][0]:+.{f}}, {v['ci'][1]:+.{f}}]  {verdict}")
    return "\n".join(lines) + "\n", res


def main(argv=None):
    p = argparse.ArgumentParser(description="Data statistics and the floor / lookup reference rows.")
    p.add_argument("--data", default="toy", help="'toy' (default), a folder with the real .npz files, or a sample .npz")
    p.add_argument("--detector", default="both", choices=["neutron", "proton", "both"], help="which calorimeter(s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N events (quick look)")
    p.add_argument("--min-photons", type=int, default=None, help="keep responses with at least this photon sum")
    p.add_argument("--split", default="both", choices=["random", "disjoint", "both"], help="split mode(s)")
    p.add_argument("--reps", type=int, default=5, help="repetitions for mean and std")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on the first N test events only")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy data and of the split")
    p.add_argument("--plot", default=None, metavar="DIR", help="write sample grids and channel histograms here")
    p.add_argument("--json", default=None, help="also write everything to this JSON file (with --compare: the "
                   "differences and their intervals)")
    p.add_argument("--results", default=None, metavar="DIR", help="print the results tables (markdown) of the "
                   "eval.json files in DIR and exit: `python metrics.py --results results/ > RESULTS.md`")
    p.add_argument("--summary", action="store_true", help="with --results: the README's one-row-per-model table")
    p.add_argument("--table43", action="store_true", help="with --results: the thesis' Table 4.3 layout (its five "
                   "autoencoders, CNN and ViT) from the files named in metrics.TABLE43; missing cells marked")
    p.add_argument("--update-readme", default=None, metavar="README", help="with --results: also rewrite the summary "
                   "table between README's markers: `python metrics.py --results results/ --update-readme README.md "
                   "> RESULTS.md` regenerates both")
    p.add_argument("--curve", nargs="+", default=None, metavar="RUN", help="plot the validation W of these training "
                   "runs (folders with metrics.jsonl) against steps into --out PNG and exit")
    p.add_argument("--out", default="curve.png", help="with --curve: the PNG to write")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A.json", "B.json"), help="paired bootstrap "
                   "interval of the W (and W / floor, AUC) difference of two eval.json files on the same test events, "
                   "from the .sums.npz each names; says whether it excludes 0")
    p.add_argument("--protocol", default=None, choices=PROTOCOLS, help="W protocol: mean-of-reps (each repetition's "
                   "W, averaged: the default) or pooled (one W of all repetitions together: the publications' code); "
                   "for --compare, --references")
    p.add_argument("--bootstrap", type=int, default=N_BOOT, help="bootstrap draws over test particles (0: none)")
    p.add_argument("--references", default=None, metavar="DIR", help="also write the floor and lookup rows under "
                   "protocol 2 as DIR/reference_<detector>_<split>.json (+ .sums.npz) for the results tables")
    p.add_argument("--sweep-table", nargs="+", default=None, metavar="JSON", help="print the quality-vs-speed tables "
                   "(markdown) of these sweep.json files (a script's --eval --sweep)")
    args = p.parse_args(argv)
    if args.compare:
        try:
            text, res = compare(*args.compare, n_boot=args.bootstrap or N_BOOT, protocol=args.protocol)
        except (FileNotFoundError, ValueError, KeyError) as e:
            sys.exit(f"error: --compare: {e}")
        sys.stdout.write(text)
        if args.json:                             # e.g. results/compare_A_B_<split>.json, cited by the README
            try:
                Path(args.json).write_text(json.dumps(dict(
                    res, command="python metrics.py " + " ".join(sys.argv[1:] if argv is None else argv)), indent=1) + "\n")
            except OSError as e:
                sys.exit(f"error: --json {args.json}: cannot write it ({e.strerror})")
            print(f"written {args.json}")
        return
    if args.sweep_table:
        try:
            sys.stdout.write(sweep_markdown(args.sweep_table))
        except (FileNotFoundError, ValueError, KeyError) as e:
            sys.exit(f"error: --sweep-table: {e}")
        return
    if args.curve:
        try:
            plot_curve(args.curve, args.out, title="validation W during training")
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: --curve: {e}")
        print(f"wrote {args.out}")
        return
    if args.results:
        if not Path(args.results).is_dir():
            sys.exit(f"error: --results: no such folder {args.results}")
        if args.update_readme:               # rewrite the summary block between the README's markers
            text = Path(args.update_readme).read_text()
            start = text.index("\n", text.index("<!-- summary: generated by")) + 1
            end = text.index("<!-- end of summary -->")
            Path(args.update_readme).write_text(text[:start] + results_summary(args.results) + text[end:])
            print(f"updated the summary table in {args.update_readme}", file=sys.stderr)
        sys.stdout.write((table43 if args.table43 else results_summary if args.summary else results_markdown)(args.results))
        return
    dets = ["neutron", "proton"] if args.detector == "both" else [args.detector]
    modes = list(data.SPLIT_MODES) if args.split == "both" else [args.split]
    result = {}
    try:
        for det in dets:
            t0 = time.time()
            ds = data.load(det, args.data, args.limit, args.seed, args.min_photons)
            st = data_stats(ds)
            print_stats(ds, st)
            result[det] = dict(stats=st, load_seconds=time.time() - t0)
            for mode in modes:
                split = data.Split(ds, mode, args.seed)
                n_test = len(split.idx["test"][:args.max_test])
                print(f"\n  split '{mode}': train {len(split.idx['train'])}, val {len(split.idx['val'])}, "
                      f"test {len(split.idx['test'])} (evaluated: {n_test}, {args.reps} repetitions)")
                t0 = time.time()
                recs = {"floor": {}, "lookup": {}}
                fl = floor(split, args.reps, args.max_test, record=recs["floor"])
                lk = lookup(split, args.reps, args.max_test, record=recs["lookup"])
                recs = {k: v or None for k, v in recs.items()}
                idx = split.idx["test"][:args.max_test]
                true_sums = channel_sums(ds.images[idx])
                unc = uncertainty(boot_rows(true_sums, ds.cond_id[idx], recs, args.bootstrap)) if args.bootstrap else None
                seconds = time.time() - t0
                print("  " + table({"floor (re-simulation)": fl, "lookup (nearest train)": lk}, fl).replace("\n", "\n  "))
                if unc:
                    print("  " + uncertainty_text(unc).replace("\n", "\n  "))
                result[det][mode] = dict(floor=fl, lookup=lk, n_test=n_test, reps=args.reps, uncertainty=unc)
                if args.references:
                    out = Path(args.references)
                    out.mkdir(parents=True, exist_ok=True)
                    ref = out / f"reference_{det}_{mode}.json"
                    save_sums(ref.with_suffix(".sums.npz"), idx, ds.cond_id[idx], true_sums, recs)
                    ref.write_text(json.dumps(dict(
                        kind="reference", name="floor and lookup", floor=fl, lookup=lk, detector=det, data=ds.source,
                        split=mode, n_test=n_test, reps=args.reps, n_shower=min(n_test, SHOWER_N), seconds=seconds,
                        command="metrics.py " + " ".join(sys.argv[1:] if argv is None else argv),
                        protocol=protocol_block(args.protocol or "mean-of-reps", n_test, args.reps, args.bootstrap),
                        uncertainty=unc, sums=ref.with_suffix(".sums.npz").name), indent=1))
                    print(f"  written {ref}")
                if args.plot and mode == modes[0]:
                    out = Path(args.plot)
                    out.mkdir(parents=True, exist_ok=True)
                    idx = split.idx["test"][:args.max_test]
                    if ds.is_toy:
                        sim, _ = data.resimulate(ds.particles[idx], det, 10_000, ds.cut)
                        plot_histograms(ds.images[idx], sim, out / f"{det}_hist.png", ("data", "re-simulation"),
                                        f"{det}: channel sums of the test set vs a re-simulation")
                        plot_grid(ds.images[idx], sim, out / f"{det}_grid.png", 10, ("data", "resim"),
                                  f"{det}: test responses (top) and re-simulations of the same particles (bottom)")
                    print(f"  plots written to {out}/")
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
