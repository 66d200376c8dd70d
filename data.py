"""Data for the ALICE Zero Degree Calorimeter fast-simulation models.

Two jobs, one interface:

1. Load the real ALICE files (``--data DIR``): a responses file (N, H, W) of photon counts and a particles
   file (N, 10) ``E, vx, vy, vz, px, py, pz, mass, charge, pdg`` (or the 9 feature columns without the PDG
   id). A sample file written by any model's ``--sample`` (keys ``responses`` and ``particles``) loads too.
2. A fast toy Monte Carlo of both calorimeters (``--data toy``, the default). It writes exactly the real file
   format into a cache folder (``$ZDC_CACHE``, default ``~/.cache/zdc_fastsim``) and is then loaded by the
   same code path as real data. Because it is a simulator, :func:`resimulate` can redraw any set of
   conditions with fresh randomness: that gives the exact noise floor of every metric.

Toy physics in one paragraph (all lengths in cm, energies in GeV). A few thousand distinct particles are
drawn (21 types, energy 1-7000 GeV), each simulated ``runs`` times with fresh randomness. The impact point
on the detector plane at L = 112.6 m is vertex + (px, py) / |pz| * L, plus a magnetic deflection
x += K q / p (K = 66 cm TeV) for charged particles, so positive ones bend toward ZP. A shower is a set of
photons drawn from a profile: Gaussian core blob(s), an exponential halo and a wide exponential spray;
photons are binned into fibres and those falling off the detector face are lost (edge containment). Binning
a Poisson number of photons drawn from the profile is exactly a Poisson draw per fibre of the integrated
profile, at a cost proportional to the photon count rather than the pixel count. Electromagnetic showers
are reproducible (Poisson + 3 % gain); hadronic ones fluctuate through the first-interaction depth
(leakage), the electromagnetic fraction, 1-4 displaced sub-cores and the halo; strange hadrons (Lambda,
K0, Sigma, Xi) additionally lose a random fraction of their energy to decay products.
Everything tunable is in ``TOY``; its hash names the cache folder, so a change regenerates the data.

Contents
  Part I   the data: detectors and files, the toy Monte Carlo, loading and validation, preprocessing,
           splits and batches. Read this to know what a model is trained on.
  Part II  run plumbing, shared by every model script: no need to read it to learn a model.
           The command line (common flags, settings and --set, --smoke), devices and seeds, checkpoints,
           `Run` (one training run: resume, epochs and batches, checkpoints, logging, progress, DDP),
           several processes (torchrun), the `Sampler` contract, sample files, ONNX export, and `main`,
           which is every script's `__main__`.
"""
import hashlib
import argparse
import json
import math
import os
import sys
import time
from collections import namedtuple
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from scipy.special import ndtr, ndtri
from tqdm import tqdm

# ==========================================================================================================
# PART I. The data
# ==========================================================================================================
# ----------------------------------------------------------------------------------------------------------
# Detectors and file names
# ----------------------------------------------------------------------------------------------------------
SHAPES = {"neutron": (44, 44), "proton": (56, 30)}
JOINT = ("neutron", "proton")   # --detector joint: both responses of the same particles (load_joint)
FILES = {  # the real ALICE file names for the neutron set; the proton set follows the same pattern
    "neutron": ("data_nonrandom_responses.npz", "data_nonrandom_particles.npz"),
    "proton": ("data_proton_responses.npz", "data_proton_particles.npz"),
}
FEATURES = ["E", "vx", "vy", "vz", "px", "py", "pz", "mass", "charge"]  # the 9 conditioning features


class DataError(ValueError):
    """Bad input data: the message names the file and the problem."""


# 21 particle types: name, PDG id, mass (MeV), charge (e), shower class, production weight.
# The production weights are the mix of *drawn* particles. They were tuned (see tests/test_data.py for the
# measured result) so that the neutron set, after transport and the >= 10 photon cut, lands near the
# published mix: photons 61 %, neutrons 23 %, protons 5 %, Lambda 3 %, K0S 2 %, K0L 2 %, pi+ 1.3 %.
PARTICLES = [
    ("gamma", 22, 0.0, 0, "em", 0.560),
    ("n", 2112, 939.565, 0, "had", 0.220),
    ("p", 2212, 938.272, 1, "had", 0.045),
    ("Lambda", 3122, 1115.683, 0, "strange", 0.032),
    ("K0S", 310, 497.611, 0, "strange", 0.022),
    ("K0L", 130, 497.611, 0, "strange", 0.022),
    ("pi+", 211, 139.570, 1, "had", 0.026),
    ("pi-", -211, 139.570, -1, "had", 0.004),
    ("K+", 321, 493.677, 1, "had", 0.004),
    ("K-", -321, 493.677, -1, "had", 0.003),
    ("nbar", -2112, 939.565, 0, "had", 0.006),
    ("pbar", -2212, 938.272, -1, "had", 0.003),
    ("Lambdabar", -3122, 1115.683, 0, "strange", 0.005),
    ("e-", 11, 0.511, -1, "em", 0.003),
    ("e+", -11, 0.511, 1, "em", 0.004),
    ("mu-", 13, 105.658, -1, "mip", 0.003),
    ("mu+", -13, 105.658, 1, "mip", 0.003),
    ("Sigma+", 3222, 1189.37, 1, "strange", 0.004),
    ("Sigma-", 3112, 1197.449, -1, "strange", 0.002),
    ("Xi0", 3322, 1314.86, 0, "strange", 0.003),
    ("Xi-", 3312, 1321.71, -1, "strange", 0.002),
]
PDG_NAMES = {p[1]: p[0] for p in PARTICLES}
_PDG = np.array([p[1] for p in PARTICLES])
_MASS = np.array([p[2] for p in PARTICLES])
_CHARGE = np.array([p[3] for p in PARTICLES], dtype=float)
_CLASS = np.array([["em", "had", "strange", "mip"].index(p[4]) for p in PARTICLES])
_WEIGHT = np.array([p[5] for p in PARTICLES]) / sum(p[5] for p in PARTICLES)

# Every tunable number of the toy. Its hash (with the version) names the cache folder.
TOY = dict(
    version=1,
    L=11260.0, k_bend=66.0,                      # detector distance (cm); deflection x = k_bend q / p[TeV]
    n_conditions=14400, runs=170, chunk=16,       # distinct particles, runs per particle, particles per chunk
    logE_median=3.8, logE_sigma=1.7,             # ln-normal energy spectrum of drawn particles (GeV)
    beam_frac=dict(n=0.01, p=0.5),             # fraction of a type at the 7 TeV beam-energy bump
    pt_sigma=0.2, pt_power=0.5, vtx_sigma=1e-5, vz_sigma=0.02, vtx_zero=0.4,
    neutron=dict(x0=-3.52, y0=-3.52, pitch=0.16, core=0.20, halo=1.0, spray=3.0,
                 yield_em=0.58, yield_had=0.40, mip=12.0, cut=10),
    proton=dict(x0=13.15, y0=-6.0, pitch=0.40, core=0.35, halo=2.0, spray=6.0,
                yield_em=0.45, yield_had=0.30, mip=8.0, cut=1),
    em=dict(core=0.80, halo=0.18, gain=0.03),    # light fractions and gain spread of EM showers
    had=dict(depth=0.6, em_mean=0.4, halo=0.30, halo_spread=0.4, subcore_spread=2.5),
    spray=dict(em=0.02, had=0.05),
    strange_visible=(0.6, 0.8),                  # Beta(a, b) visible fraction after decay in flight
)
MAX_SUBCORES = 4


def cache_dir():
    return Path(os.environ.get("ZDC_CACHE", Path.home() / ".cache" / "zdc_fastsim"))


def toy_hash(toy=TOY):
    return hashlib.sha1(json.dumps(toy, sort_keys=True).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------------------
# Toy Monte Carlo
# ----------------------------------------------------------------------------------------------------------
def draw_particles(n, rng, toy=TOY):
    """Draw n distinct particles: (n, 10) array E, vx, vy, vz, px, py, pz, mass, charge, pdg."""
    t = rng.choice(len(PARTICLES), size=n, p=_WEIGHT)
    m = _MASS[t] / 1000.0
    lo, hi = ndtr((np.log([1.0, 7000.0]) - toy["logE_median"]) / toy["logE_sigma"])  # truncated ln-normal
    E = np.exp(toy["logE_median"] + toy["logE_sigma"] * ndtri(rng.uniform(lo, hi, n)))
    beam = np.zeros(n, bool)
    for name, frac in toy["beam_frac"].items():
        sel = _PDG[t] == next(p[1] for p in PARTICLES if p[0] == name)
        beam |= sel & (rng.random(n) < frac)
    E = np.where(beam, 7000.0 - np.abs(rng.normal(0, 30.0, n)), E)
    E = np.clip(E, np.maximum(1.0, 1.05 * m), 7000.0)
    p = np.sqrt(np.maximum(E**2 - m**2, 1e-12))
    px, py = rng.normal(0, toy["pt_sigma"], (2, n)) * (E / 550.0) ** toy["pt_power"]
    pt = np.hypot(px, py)
    shrink = np.minimum(1.0, 0.5 * p / np.maximum(pt, 1e-12))  # keep the particle forward
    px, py = px * shrink, py * shrink
    pz = np.sqrt(p**2 - px**2 - py**2) * rng.choice([-1.0, 1.0], n)
    zero = rng.random(n) < toy["vtx_zero"]
    vx, vy = np.where(zero, 0.0, rng.normal(0, toy["vtx_sigma"], (2, n)))
    vz = np.where(zero, 0.0, rng.normal(0, toy["vz_sigma"], n))
    return np.stack([E, vx, vy, vz, px, py, pz, _MASS[t], _CHARGE[t], _PDG[t]], 1)


def type_index(particles):
    """Index into PARTICLES for each row: from the PDG id when given, else from (mass, charge)."""
    particles = np.asarray(particles, float)
    if particles.shape[1] >= 10 and np.all(np.isin(particles[:, 9], _PDG)):
        sorter = np.argsort(_PDG)
        return sorter[np.searchsorted(_PDG, particles[:, 9], sorter=sorter)]
    d = np.abs(particles[:, 7:8] - _MASS[None]) + 1e3 * np.abs(particles[:, 8:9] - _CHARGE[None])
    if np.any(d.min(1) > 1.0):
        bad = int(np.argmax(d.min(1) > 1.0))
        raise DataError(f"particle row {bad} (mass {particles[bad, 7]} MeV, charge {particles[bad, 8]}) "
                        "matches none of the toy's 21 particle types: cannot simulate it")
    return d.argmin(1)


def _shower(particles, rng, toy):
    """Detector-independent part of each event: impact point, visible energy, light fractions, sub-cores."""
    n = len(particles)
    t = type_index(particles)
    cls = _CLASS[t]
    E, vx, vy, _, px, py, pz, _, q = particles[:, :9].T
    p = np.sqrt(px**2 + py**2 + pz**2)
    x = vx + px / np.abs(pz) * toy["L"] + toy["k_bend"] * q / np.maximum(p / 1000.0, 1e-6)
    y = vy + py / np.abs(pz) * toy["L"]
    em, had = cls == 0, (cls == 1) | (cls == 2)
    # visible energy
    vis = E * np.exp(rng.normal(0, toy["em"]["gain"], n))
    depth = rng.exponential(1.0, n)                       # first interaction depth (interaction lengths)
    f_em = rng.beta(2.0, 2.0 / toy["had"]["em_mean"] - 2.0, n)
    had_vis = E * np.exp(-toy["had"]["depth"] * depth) * (1 + 0.45 * f_em) / (1 + 0.45 * toy["had"]["em_mean"])
    vis = np.where(had, had_vis, vis)
    vis = np.where(cls == 2, vis * rng.beta(*toy["strange_visible"], n), vis)
    # light fractions: core (split into sub-cores), halo, spray
    halo = np.where(em, toy["em"]["halo"],
                    toy["had"]["halo"] * np.exp(rng.normal(0, toy["had"]["halo_spread"], n)))
    spray = np.where(em, toy["spray"]["em"], toy["spray"]["had"])
    core = np.where(had, 0.3 + 0.5 * f_em, 1.0 - toy["em"]["halo"] - toy["spray"]["em"])
    total = core + halo + spray
    k = np.where(had, 1 + rng.binomial(MAX_SUBCORES - 1, 0.4, n), 1)
    share = rng.gamma(1.5, 1.0, (n, MAX_SUBCORES)) * (np.arange(MAX_SUBCORES)[None] < k[:, None])
    share /= share.sum(1, keepdims=True)
    offset = rng.normal(0, 1.0, (2, n, MAX_SUBCORES)) * had[None, :, None] * (np.arange(MAX_SUBCORES) > 0)
    offset *= np.where(cls == 2, 2.0, 1.0)[None, :, None]
    width = np.exp(rng.normal(0, 0.15, (n, MAX_SUBCORES)))  # core width jitter (relative)
    return dict(cls=cls, x=x, y=y, vis=vis, core=share * (core / total)[:, None], halo=halo / total,
                spray=spray / total, offset=offset, width=width, jitter=rng.normal(0, 1.0, (2, n)))


def _radial_exp(rng, n, scale):
    """Offsets with 2-D density proportional to exp(-r / scale): r ~ Gamma(2, scale)."""
    r = rng.gamma(2.0, scale)
    phi = rng.uniform(0, 2 * np.pi, n)
    return r * np.cos(phi), r * np.sin(phi)


def _photons(sh, det, rng, toy):
    """Photons of one detector for the showers `sh` that land on its face: (event index, flat pixel)."""
    d = toy[det]
    H, W = SHAPES[det]
    n = len(sh["x"])
    yld = np.select([sh["cls"] == 0, sh["cls"] == 3], [d["yield_em"], 0.0], d["yield_had"])
    mu = yld * sh["vis"] + np.where(sh["cls"] == 3, d["mip"], 0.0)
    x0, y0, x1, y1 = d["x0"], d["y0"], d["x0"] + H * d["pitch"], d["y0"] + W * d["pitch"]

    def dist(cx, cy):  # distance from a point to the detector face (0 inside)
        return np.hypot(np.maximum(0, np.maximum(x0 - cx, cx - x1)), np.maximum(0, np.maximum(y0 - cy, cy - y1)))

    comps = []  # (event index, x, y) of every photon of every component
    ev = np.arange(n)
    # core blobs: Gaussian with width core * jitter; blobs farther than 7 widths from the face are skipped
    cx = sh["x"][:, None] + sh["offset"][0] * d["core"] * toy["had"]["subcore_spread"]
    cy = sh["y"][:, None] + sh["offset"][1] * d["core"] * toy["had"]["subcore_spread"]
    sig = d["core"] * sh["width"]
    cnt = rng.poisson(mu[:, None] * sh["core"] * (dist(cx, cy) < 7 * sig)).ravel()
    e = np.repeat(np.repeat(ev, MAX_SUBCORES), cnt)
    s = np.repeat(sig.ravel(), cnt)
    comps.append((e, np.repeat(cx.ravel(), cnt) + s * rng.standard_normal(len(e)),
                  np.repeat(cy.ravel(), cnt) + s * rng.standard_normal(len(e))))
    # halo (centre jittered by a core width) and spray: radial exponentials, skipped beyond 12 scales
    hx, hy = sh["x"] + d["core"] * sh["jitter"][0], sh["y"] + d["core"] * sh["jitter"][1]
    for frac, scale in ((sh["halo"], d["halo"]), (sh["spray"], d["spray"])):
        cnt = rng.poisson(mu * frac * (dist(hx, hy) < 12 * scale))
        e = np.repeat(ev, cnt)
        ox, oy = _radial_exp(rng, len(e), np.full(len(e), scale))
        comps.append((e, np.repeat(hx, cnt) + ox, np.repeat(hy, cnt) + oy))
    e = np.concatenate([c[0] for c in comps])
    ix = np.floor((np.concatenate([c[1] for c in comps]) - x0) / d["pitch"]).astype(np.int64)
    iy = np.floor((np.concatenate([c[2] for c in comps]) - y0) / d["pitch"]).astype(np.int64)
    on = (ix >= 0) & (ix < H) & (iy >= 0) & (iy < W)       # photons off the face are lost
    return e[on], ix[on] * W + iy[on]


def _images(e, pix, rows, n, shape):
    """Bin photons into images (len(rows), H, W) uint16 for the events `rows` (of n) only."""
    hw = shape[0] * shape[1]
    slot = np.full(n, -1)
    slot[rows] = np.arange(len(rows))
    sel = slot[e] >= 0
    counts = np.bincount(slot[e[sel]] * hw + pix[sel], minlength=len(rows) * hw)
    return counts.reshape((len(rows),) + shape).astype(np.uint16)


def simulate(particles, rng, toy=TOY, detectors=("neutron", "proton")):
    """One event per row of `particles` (n, 9 or 10): dict detector -> photon counts (n, H, W) uint16."""
    particles = np.asarray(particles, float)
    sh = _shower(particles, rng, toy)
    n = len(particles)
    return {det: _images(*_photons(sh, det, rng, toy), np.arange(n), n, SHAPES[det]) for det in detectors}


def _chunk(seed, c, toy, joint=False):
    """Chunk c of the toy set: its own seeds, so any prefix of chunks is the same whatever the total.
    joint=True: instead, the joint set's events (either response passes its cut), both images of each; the
    random stream is the same, so the joint set is exactly the union of the two single-detector sets."""
    rng_p = np.random.default_rng([seed, 0, c])
    particles = draw_particles(toy["chunk"], rng_p, toy)
    events = np.repeat(particles, toy["runs"], axis=0)
    cond = np.repeat(np.arange(c * toy["chunk"], (c + 1) * toy["chunk"]), toy["runs"])
    rng = np.random.default_rng([seed, 1, c])
    sh = _shower(events, rng, toy)
    photons = {det: _photons(sh, det, rng, toy) for det in SHAPES}
    passed = {det: np.bincount(photons[det][0], minlength=len(events)) >= toy[det]["cut"] for det in SHAPES}
    if joint:
        keep = np.flatnonzero(np.any(list(passed.values()), 0))
        return {"joint": ({det: _images(*photons[det], keep, len(events), SHAPES[det]) for det in SHAPES},
                          events[keep], cond[keep])}
    out = {}
    for det in SHAPES:  # bin only the events that pass the set's photon cut
        keep = np.flatnonzero(passed[det])
        out[det] = (_images(*photons[det], keep, len(events), SHAPES[det]), events[keep], cond[keep])
    return out


def generate_toy(seed=0, n_chunks=None, limit=None, detector="neutron", toy=TOY, progress=True):
    """Simulate the toy sets. Either `n_chunks` chunks of `toy['chunk']` distinct particles, or as many
    chunks as needed for `limit` events of `detector`. Returns dict detector -> (images, particles)."""
    full = toy["n_conditions"] // toy["chunk"]
    n_chunks = n_chunks or full
    joint = detector == "joint"   # then the one set "joint": ({detector: images}, particles)
    sets = ["joint"] if joint else list(SHAPES)
    parts = {det: [] for det in sets}
    have = 0
    chunks = range(n_chunks if limit is None else full)
    workers = 1 if limit is not None else min(os.cpu_count() or 1, 8)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    args = [seed] * len(chunks), chunks, [toy] * len(chunks), [joint] * len(chunks)
    results = pool.map(_chunk, *args, chunksize=8) if pool else map(_chunk, *args)
    bar = tqdm(results, total=len(chunks), desc="toy Monte Carlo", unit="chunk", disable=not progress, leave=False)
    for out in bar:
        for det in sets:
            parts[det].append(out[det])
        have += len(out[detector][1])
        bar.set_postfix(events=have, refresh=False)
        if limit is not None and have >= limit:
            break
    if pool:
        pool.shutdown()
    if joint:
        return {"joint": ({det: np.concatenate([p[0][det] for p in parts["joint"]]) for det in SHAPES},
                          np.concatenate([p[1] for p in parts["joint"]]))}
    return {det: (np.concatenate([p[0] for p in parts[det]]), np.concatenate([p[1] for p in parts[det]]))
            for det in SHAPES}


def toy_folder(seed=0, limit=None, detector="neutron", toy=TOY, progress=True):
    """The cache folder of the toy set (real file format), generated on first use."""
    tag = f"toy-{toy_hash(toy)}-seed{seed}" + ("" if limit is None else f"-{detector}{limit}")
    tag += "-joint" if detector == "joint" and limit is None else ""
    folder = cache_dir() / tag
    if not (folder / "done").exists():
        t0 = time.time()
        sets = generate_toy(seed, limit=limit, detector=detector, toy=toy, progress=progress)
        if detector == "joint":   # the joint folder: both detectors' file pairs, row-aligned particles
            images, particles = sets.pop("joint")
            sets = {det: (images[det], particles) for det in SHAPES}
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        for det, (images, particles) in sets.items():
            (tmp / det).mkdir(parents=True, exist_ok=True)
            np.savez(tmp / det / FILES[det][0], images)
            np.savez(tmp / det / FILES[det][1], particles)
        (tmp / "done").write_text(json.dumps(dict(toy=toy, seed=seed, limit=limit, seconds=time.time() - t0)))
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            pass
        if progress:
            print(f"toy data written to {folder} in {time.time() - t0:.1f} s")
    return folder


def resimulate(particles, detector, seed=0, cut=None, toy=TOY, max_rounds=1000):
    """Fresh toy responses for the given conditions, drawn from the same distribution as the data set:
    events below the set's photon cut (default: the toy's) are redrawn, as the cut did to the data.
    Returns counts (n, H, W) and the number of events still below the cut after `max_rounds` (normally 0).
    detector="joint": both responses of each event, redrawn while neither passes its cut (`cut`: a dict
    detector -> cut); returns ({detector: counts}, number still below)."""
    dets = JOINT if detector == "joint" else (detector,)
    cuts = cut if isinstance(cut, dict) else {detector: cut}
    cuts = {det: toy[det]["cut"] if cuts.get(det) is None else cuts[det] for det in dets}
    rng = np.random.default_rng([seed, 2])
    particles = np.asarray(particles, float)
    out = {det: np.zeros((len(particles),) + SHAPES[det], np.uint16) for det in dets}
    todo = np.arange(len(particles))
    for _ in range(max_rounds):
        img = simulate(particles[todo], rng, toy, dets)
        passed = np.zeros(len(todo), bool)
        for det in dets:
            out[det][todo] = img[det]
            passed |= img[det].reshape(len(todo), -1).sum(1, dtype=np.int64) >= cuts[det]
        todo = todo[~passed]
        if len(todo) == 0:
            break
    return (out if detector == "joint" else out[detector]), len(todo)


# ----------------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------------
def _read_npz(path, keys):
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            for k in keys:
                if k in f.files:
                    return f[k]
            raise DataError(f"{path}: no array named {' or '.join(keys)} (found {', '.join(f.files) or 'none'})")
    except DataError:
        raise
    except Exception as e:  # zip/pickle errors: not an npz file
        raise DataError(f"{path}: cannot be read as an .npz file ({e})") from None


def validate(images, particles, detector, name="data"):
    """Check one data set; return (counts as float32 view-able ints, particles (N, 10) float64)."""
    H, W = SHAPES[detector]
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != (H, W):
        other = [d for d, s in SHAPES.items() if images.shape[1:] == s]
        hint = f" (that is the {other[0]} detector: use --detector {other[0]})" if other else ""
        raise DataError(f"{name}: responses have shape {images.shape}, expected (N, {H}, {W}) for the "
                        f"{detector} detector{hint}")
    if particles.ndim != 2 or particles.shape[1] not in (9, 10):
        raise DataError(f"{name}: particles have shape {particles.shape}, expected (N, 9) or (N, 10) "
                        "columns E, vx, vy, vz, px, py, pz, mass, charge[, pdg]")
    if len(images) != len(particles):
        raise DataError(f"{name}: {len(images)} responses but {len(particles)} particles")
    if len(images) == 0:
        raise DataError(f"{name}: the data set is empty")
    if not np.issubdtype(images.dtype, np.number) or not np.issubdtype(particles.dtype, np.number):
        raise DataError(f"{name}: arrays must be numeric (got {images.dtype} and {particles.dtype})")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise DataError(f"{name}: responses contain NaN or inf (first bad event: "
                        f"{int(np.argmax(~np.isfinite(images).reshape(len(images), -1).all(1)))})")
    if images.dtype.kind in "fi" and (images < 0).any():
        raise DataError(f"{name}: responses contain negative photon counts (first bad event: "
                        f"{int(np.argmax((images < 0).reshape(len(images), -1).any(1)))})")
    particles = particles.astype(np.float64)
    if not np.isfinite(particles).all():
        raise DataError(f"{name}: particles contain NaN or inf (first bad row: "
                        f"{int(np.argmax(~np.isfinite(particles).all(1)))})")
    if particles.shape[1] == 9:  # no PDG id: infer it from (mass, charge) where possible, else 0
        d = np.abs(particles[:, 7:8] - _MASS[None]) + 1e3 * np.abs(particles[:, 8:9] - _CHARGE[None])
        pdg = np.where(d.min(1) < 1.0, _PDG[d.argmin(1)], 0)
        particles = np.concatenate([particles, pdg[:, None].astype(float)], 1)
    return images, particles


class ZDCData:
    """One detector's data set: raw photon counts (N, H, W), particles (N, 10), condition ids (N,).
    `cut`: the minimum photon sum of the set (the toy re-simulates with it for the noise floor)."""

    def __init__(self, images, particles, detector, source, cut=None, toy=False):
        self.has_pdg = particles.ndim == 2 and particles.shape[1] == 10   # the file gave the PDG id (else inferred)
        self.images, self.particles = validate(images, particles, detector, source)
        self.detector, self.source, self.is_toy = detector, source, toy
        self.cut = TOY[detector]["cut"] if cut is None else cut
        _, self.cond_id = np.unique(self.particles[:, :9], axis=0, return_inverse=True)
        self.cond_id = self.cond_id.ravel()

    def __len__(self):
        return len(self.images)

    @property
    def features(self):
        return self.particles[:, :9]


def find_files(folder, detector):
    """The (responses, particles) pair for `detector` in `folder`: the real file names, else a unique
    *responses*.npz / *particles*.npz pair whose images have the detector's shape."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (give --data toy, a folder with the .npz files, "
                        "or a sample .npz file)")
    for sub in (folder / detector, folder):
        pair = sub / FILES[detector][0], sub / FILES[detector][1]
        if pair[0].exists() or pair[1].exists():
            return pair
    resp = sorted(folder.glob("*responses*.npz"))
    if len(resp) == 1:
        part = Path(str(resp[0]).replace("responses", "particles"))
        return resp[0], part
    raise DataError(f"{folder}: expected {FILES[detector][0]} and {FILES[detector][1]} (or exactly one "
                    f"*responses*.npz with its *particles*.npz); found {[p.name for p in resp] or 'none'}")


def load(detector="neutron", data="toy", limit=None, seed=0, min_photons=None, progress=True):
    """Load a data set. `data`: 'toy', a folder with the real files, or a sample .npz (responses,
    particles). `limit`: keep only the first `limit` events (the toy then simulates only what it needs).
    `min_photons`: keep only responses with at least this photon sum (published ZP sets use 1, 5 or 18;
    the toy's own cuts are 10 for ZN and 1 for ZP)."""
    if detector == "joint":
        return load_joint(data, limit, seed, min_photons, progress)
    if detector not in SHAPES:
        raise DataError(f"unknown detector {detector!r}: use one of {', '.join(SHAPES)} or joint")
    if limit is not None and limit < 10:
        raise DataError(f"--limit {limit}: need at least 10 events")
    if str(data) == "toy":
        folder = toy_folder(seed, limit, detector, progress=progress)
        source = f"toy(seed={seed}{'' if limit is None else f', limit={limit}'})"
        resp, part = folder / detector / FILES[detector][0], folder / detector / FILES[detector][1]
        images, particles = _read_npz(resp, ["arr_0"]), _read_npz(part, ["arr_0"])
    elif Path(data).suffix == ".npz":
        path = Path(data)
        images, particles = _read_npz(path, ["responses"]), _read_npz(path, ["particles"])
        source = str(path)
    else:
        resp, part = find_files(data, detector)
        images, particles = _read_npz(resp, ["arr_0", "responses"]), _read_npz(part, ["arr_0", "particles"])
        source = str(resp.parent)
    if min_photons is not None:
        keep = images.reshape(len(images), -1).sum(1) >= min_photons
        images, particles = images[keep], particles[keep]
        source += f", >= {min_photons} photons"
    if limit is not None:
        images, particles = images[:limit], particles[:limit]
    cut = max(TOY[detector]["cut"], min_photons or 0) if str(data) == "toy" else min_photons
    return ZDCData(images, particles, detector, source, cut, toy=str(data) == "toy")


class JointData:
    """Both calorimeters' responses to the same particles (--detector joint): `views[det]` is a ZDCData of one
    detector sharing the particles and condition ids. Its `cut` is {detector: cut}: the toy keeps an event when
    either response passes its detector's cut, so most events hold one bright and one empty or faint response.
    A view has is_toy False: one detector's re-simulation is not the joint set's floor (resimulate 'joint' is)."""
    detector = "joint"

    def __init__(self, images, particles, source, toy=False):
        self.views = {det: ZDCData(images[det], particles, det, f"{source} [{det}]", toy=False) for det in JOINT}
        first = self.views[JOINT[0]]
        self.particles, self.cond_id, self.source, self.is_toy = first.particles, first.cond_id, source, toy
        self.cut = {det: TOY[det]["cut"] for det in JOINT} if toy else None
        self.images = {det: v.images for det, v in self.views.items()}

    def __len__(self):
        return len(self.particles)

    @property
    def features(self):
        return self.particles[:, :9]


def load_joint(data="toy", limit=None, seed=0, min_photons=None, progress=True):
    """The joint set: 'toy' (events where either response passes its cut), a folder holding the neutron and the
    proton file pairs (in neutron/ and proton/ or side by side) whose particles files must be identical row by
    row, or a joint sample .npz (responses_neutron, responses_proton, particles)."""
    if min_photons is not None:
        raise DataError("--min-photons selects one detector's responses; the joint set keeps an event when either "
                        "response passes its detector's cut (toy: ZN >= 10 or ZP >= 1 photons)")
    if limit is not None and limit < 10:
        raise DataError(f"--limit {limit}: need at least 10 events")
    if str(data) == "toy":
        folder = toy_folder(seed, limit, "joint", progress=progress)
        source = f"toy(seed={seed}, joint{'' if limit is None else f', limit={limit}'})"
    elif Path(data).suffix == ".npz":
        path = Path(data)
        images = {det: _read_npz(path, [f"responses_{det}"]) for det in JOINT}
        particles = _read_npz(path, ["particles"])
        return JointData({d: im[:limit] for d, im in images.items()}, particles[:limit], str(path))
    else:
        folder, source = Path(data), str(data)
    images, particles = {}, {}
    for det in JOINT:
        resp, part = find_files(folder, det)
        images[det], particles[det] = _read_npz(resp, ["arr_0", "responses"]), _read_npz(part, ["arr_0", "particles"])
        if len(images[det]) != len(particles[det]):
            raise DataError(f"{resp}: {len(images[det])} responses but {len(particles[det])} particles in {part.name}")
    pn, pp = particles["neutron"], particles["proton"]
    if pn.shape != pp.shape or not np.array_equal(pn, pp):
        m = min(len(pn), len(pp))
        differ = ~((pn[:m] == pp[:m]) | np.isnan(pn[:m]) & np.isnan(pp[:m])).reshape(m, -1).all(1)
        row = int(np.argmax(differ)) if differ.any() else m
        raise DataError(f"{folder}: the neutron and proton particles files are not row-aligned (shapes {pn.shape} "
                        f"and {pp.shape}, first differing row {row}): the joint set needs both responses of the "
                        "same particle in the same row")
    return JointData({d: im[:limit] for d, im in images.items()}, pn[:limit], source, toy=str(data) == "toy")


# ----------------------------------------------------------------------------------------------------------
# Preprocessing, splits, batches
# ----------------------------------------------------------------------------------------------------------
SPLIT_MODES = ("random", "disjoint")


def split_indices(cond_id, mode="random", seed=0, fractions=(0.7, 0.1, 0.2)):
    """Shuffled 70/10/20 train/val/test indices. 'random' shuffles events (the published protocol);
    'disjoint' shuffles distinct conditions, so no test particle vector is ever seen in training."""
    if mode not in SPLIT_MODES:
        raise DataError(f"unknown split mode {mode!r}: use one of {', '.join(SPLIT_MODES)}")
    rng = np.random.default_rng([seed, 3])
    if mode == "random":
        order = rng.permutation(len(cond_id))
        cuts = np.round(np.cumsum(fractions)[:2] * len(order)).astype(int)
        return dict(zip(("train", "val", "test"), np.split(order, cuts)))
    conds = rng.permutation(cond_id.max() + 1)
    cuts = np.round(np.cumsum(fractions)[:2] * len(conds)).astype(int)
    if min(cuts[0], cuts[1] - cuts[0], len(conds) - cuts[1]) == 0:
        raise DataError(f"the disjoint split needs more distinct conditions (have {len(conds)})")
    rank = np.empty_like(conds)
    rank[conds] = np.arange(len(conds))
    r = rank[cond_id]
    parts = (r < cuts[0], (r >= cuts[0]) & (r < cuts[1]), r >= cuts[1])
    return {k: rng.permutation(np.flatnonzero(m)) for k, m in zip(("train", "val", "test"), parts)}


def to_log(counts):
    """Raw counts (N, H, W) -> network input log1p(counts), float32 tensor (N, 1, H, W)."""
    return torch.log1p(torch.as_tensor(np.asarray(counts), dtype=torch.float32)).unsqueeze(1)


def to_counts(x):
    """Network output in log space -> raw counts: expm1, clipped at 0, shape (N, H, W)."""
    x = x.squeeze(1) if x.dim() == 4 else x
    return torch.expm1(x.float()).clamp_min(0)


POISSON_EXACT_BELOW, POISSON_TERMS = 12.0, 40


def poisson_counts(mean, u, z):
    """Poisson photon counts with the given means (N, H, W), from explicit noise of the same shape: u ~ U(0, 1) and
    z ~ N(0, 1), so that a sampler stays deterministic given its noise and exports to ONNX (which has no Poisson
    op). Means below 12: the exact inverse CDF (the number of the first 40 cumulative probabilities that u
    exceeds; P(X >= 40) < 1e-9 there). From 12 up: the Cornish-Fisher expansion of the Poisson quantile,
    round(mean + sqrt(mean) z + (z^2 - 1) / 6), whose mean, variance and skewness are the Poisson ones to
    O(mean^-1/2). The toy's fibre counts are Poisson given the shower (DATA.md), so a decoder that predicts the
    expected counts gets the data's pixel-to-pixel fluctuations from this."""
    mean = mean.float().clamp_min(0)
    small = mean.clamp_max(POISSON_EXACT_BELOW)
    p = torch.exp(-small)
    cdf, k = p, (u > p).float()
    for j in range(1, POISSON_TERMS):
        p = p * small / j
        cdf = cdf + p
        k = k + (u > cdf).float()
    big = torch.floor(mean + mean.sqrt() * z + (z * z - 1) / 6 + 0.5).clamp_min(0)
    return torch.where(mean < POISSON_EXACT_BELOW, k, big)


class Split:
    """The standard view every model trains on: split indices, feature standardisation fitted on the
    training part, and tensors. `state()` is what a checkpoint stores to rebuild it."""

    def __init__(self, ds, mode="random", seed=0):
        self.ds, self.mode, self.seed = ds, mode, seed
        self.idx = split_indices(ds.cond_id, mode, seed)
        f = ds.features[self.idx["train"]]
        self.mean, self.std = f.mean(0), f.std(0)
        self.std = np.where(self.std > 0, self.std, 1.0)

    def cond(self, part, typed=False):
        """Standardised features (n, 9); typed: with the particle-type index (type_ids) as a 10th column."""
        c = standardize(self.ds.features[self.idx[part]], self.mean, self.std)
        if typed and not self.ds.has_pdg:
            raise DataError(f"{self.ds.source}: the particles have 9 columns, no PDG id: the particle-type embedding "
                            "needs the 10th column (pdg)")
        return with_type(c, self.ds.particles[self.idx[part]]) if typed else c

    def x(self, part):
        return to_log(self.ds.images[self.idx[part]])

    def counts(self, part):
        return self.ds.images[self.idx[part]]

    def particles(self, part):
        return self.ds.particles[self.idx[part]]

    def state(self):
        return dict(detector=self.ds.detector, source=self.ds.source, split=self.mode, seed=self.seed,
                    shape=list(SHAPES[self.ds.detector]), mean=self.mean.tolist(), std=self.std.tolist())


class JointSplit:
    """The joint set's split: one set of indices and one feature standardisation for both detectors (the same
    as Split on either view). `views[det]` is that detector's Split, which metrics' functions take; x(part) and
    counts(part) are dicts detector -> tensor / array."""

    def __init__(self, ds, mode="random", seed=0):
        self.ds, self.mode, self.seed = ds, mode, seed
        self.views = {det: Split(v, mode, seed) for det, v in ds.views.items()}
        self.idx, self.mean, self.std = (getattr(self.views[JOINT[0]], k) for k in ("idx", "mean", "std"))

    def cond(self, part):
        return self.views[JOINT[0]].cond(part)

    def x(self, part):
        return {det: v.x(part) for det, v in self.views.items()}

    def counts(self, part):
        return {det: v.counts(part) for det, v in self.views.items()}

    def particles(self, part):
        return self.ds.particles[self.idx[part]]

    def state(self):
        return dict(detector="joint", source=self.ds.source, split=self.mode, seed=self.seed,
                    shape={det: list(SHAPES[det]) for det in JOINT}, mean=self.mean.tolist(), std=self.std.tolist())


def standardize(features, mean, std):
    """Raw 9 feature columns (N, >= 9) -> standardised float32 tensor (N, 9)."""
    f = np.asarray(features, dtype=np.float64)[:, :9]
    return torch.as_tensor((f - np.asarray(mean)) / np.asarray(std), dtype=torch.float32)


def type_ids(particles):
    """Particle-type index per row for a learned type embedding: the position of the PDG id (10th column) among
    the 21 types of PARTICLES, len(PARTICLES) for any other id."""
    pdg = np.asarray(particles, float)[:, 9]
    hit = pdg[:, None] == _PDG[None]
    return np.where(hit.any(1), hit.argmax(1), len(PARTICLES))


def with_type(cond, particles):
    """Standardised conditions (n, 9) with the type index of `particles` appended as a 10th column (float)."""
    return torch.cat([cond, torch.as_tensor(type_ids(particles), dtype=cond.dtype)[:, None]], 1)


def batches(tensors, batch_size, generator=None, shuffle=True, device="cpu", start=0):
    """Yield tuples of mini-batches of the given equally long tensors, moved to `device`, from batch number
    `start` on (a resumed run skips the batches of the epoch it already trained on; the order is the same)."""
    n = len(tensors[0])
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(start * batch_size, n, batch_size):
        j = order[i:i + batch_size]
        yield tuple(t[j].to(device, non_blocking=True) for t in tensors)



# ==========================================================================================================
# PART II. Run plumbing: no need to read this to learn a model
# ==========================================================================================================
# ----------------------------------------------------------------------------------------------------------
# The command line: common flags, settings (DEFAULTS < PAPER < SMOKE < explicit flags and --set)
# ----------------------------------------------------------------------------------------------------------
def parser(doc, name, detectors=None):
    """The argument parser of a model script: its docstring's first line as the description, the usage lines
    (from 'Usage:' to the first blank line after them) as the epilog, and the common flags."""
    usage = doc[doc.index("Usage:"):]
    usage = usage[:usage.find("\n\n") if "\n\n" in usage else len(usage)]
    p = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=usage,
                                usage="%(prog)s --train | --sample | --eval | --export PATH.onnx  [options]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, name, detectors)
    p.script_name = name
    g = p.add_argument_group("settings")
    g.add_argument("--paper", action="store_true", help="the publication's setting; flags still win")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting in DEFAULTS, e.g. ema=0.99 (repeatable)")
    return p


W_PROTOCOLS = ("mean-of-reps", "pooled")    # --protocol, --channels: what metrics.run_eval computes
CHANNEL_PARITIES = ("even", "odd")


def add_common_args(p, name, detectors=None):
    """The shared flags, in the same order in every model script (STYLE.md). `detectors`: the --detector
    choices of a script that does not take neutron|proton (sdigan_joint.py: joint only)."""
    g = p.add_argument_group("what to do")
    g.add_argument("--train", action="store_true", help="train (then evaluate briefly on the validation set)")
    g.add_argument("--sample", action="store_true", help="write generated responses to --out (.npz)")
    g.add_argument("--eval", action="store_true", help="full evaluation of --ckpt; writes eval.json beside it")
    g.add_argument("--smoke", action="store_true", help="tiny data, tiny model, a few steps: seconds on a CPU")
    g = p.add_argument_group("data and training")
    g.add_argument("--detector", default=None, choices=list(detectors or SHAPES),
                   help=f"{' or '.join(detectors)}: both calorimeters per particle" if detectors else
                   "neutron (ZN 44x44, default) or proton (ZP 56x30)")
    g.add_argument("--data", default="toy", help="toy, a folder of real .npz files, or a sample .npz")
    g.add_argument("--limit", type=int, default=None, help="use only the first N events")
    g.add_argument("--min-photons", type=int, default=None, help="keep responses with at least this photon sum")
    g.add_argument("--split", default="random", choices=SPLIT_MODES, help="random (published) or condition-disjoint")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (default: the script's)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps in total")
    g.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default: the script's)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: the script's)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 where bf16 is unsupported)")
    g.add_argument("--seed", type=int, default=0, help="seed of split, initialisation, noise, sampling")
    g.add_argument("--out", default=None, help=f"run folder (default runs/{name}); --sample: .npz")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--ckpt-every", type=int, default=500, help="also save the checkpoint every N steps")
    g.add_argument("--val-every", type=int, default=500, help="validate (val loss, val W) every N steps")
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument("--ckpt", default=None, help="checkpoint to use (default <out>/ckpt.pt)")
    g.add_argument("--n", type=int, default=1000, help="--sample: number of responses")
    g.add_argument("--particles", default=None, help="--sample: .npz of particles (N, 9 or 10) (default: test)")
    g.add_argument("--reps", type=int, default=5, help="--eval: repetitions with different seeds")
    g.add_argument("--max-test", type=int, default=10000, help="--eval: the first N test events (0: all)")
    g.add_argument("--protocol", default="mean-of-reps", choices=W_PROTOCOLS,
                   help="--eval: W as the mean of the repetitions' W, or one W of them pooled (the authors' code)")
    g.add_argument("--channels", default="even", choices=CHANNEL_PARITIES,
                   help="--eval: channels 1-4 read the (row+col)-even pixels (DATA.md) or the odd ones")
    g.add_argument("--plot", action="store_true", help="--eval: also write sample grids, histograms (PNG)")
    g.add_argument("--export", default=None, metavar="PATH.onnx", help="the sampler as one ONNX graph, checked "
                   "against PyTorch (needs onnx, onnxruntime)")
    return p


_UNSET = object()


def _typed(key, text, like, nullable=False):
    """--set KEY=TEXT as the type of `like` (the setting's value in DEFAULTS or PAPER); 'none' is None for a
    setting that can be None (`nullable`: None in DEFAULTS or PAPER) or a list."""
    if text.lower() == "none" and (nullable or like is None or isinstance(like, (list, tuple))):
        return None
    if isinstance(like, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key} is true or false")
        return text.lower() in ("true", "1")
    if isinstance(like, (list, tuple)):
        items = [t for t in text.split(",") if t]
        return [_typed(key, t, like[0] if like else "") for t in items]
    return type(like)(text) if like is not None else text


def parse(p, argv, defaults, paper=None, smoke=None):
    """Parse a model script's command line. Each setting takes, from the last layer that has it: argparse's
    default, `defaults` (the CPU default), `paper` (with --paper), `smoke` (with --smoke), then what the user
    gave explicitly: a flag or --set KEY=VALUE (type-checked against `defaults`; giving both is an error)."""
    given = argparse.Namespace(**{a.dest: _UNSET for a in p._actions if a.dest not in ("help", "set")})
    args = p.parse_args(argv, namespace=given)
    explicit = {k: v for k, v in vars(args).items() if v is not _UNSET}
    for k, v in [(a.dest, a.default) for a in p._actions if a.dest not in ("help", "set")]:
        setattr(args, k, v)
    paper_on, smoke_on = explicit.get("paper", False), explicit.get("smoke", False)
    for layer in (defaults, paper if paper_on else None, smoke if smoke_on else None):
        for k, v in (layer or {}).items():
            setattr(args, k, v)
    settable = {**(paper or {}), **defaults}
    for item in explicit.pop("set", None) or []:
        key, eq, text = item.partition("=")
        key = key.replace("-", "_")
        if not eq or key not in settable:
            p.error(f"--set {item}: unknown setting {key!r}; the settings are: {', '.join(sorted(settable))}")
        if key in explicit:
            p.error(f"--set {key}=...: the setting is also given as a flag; give it once")
        like = settable[key] if settable[key] is not None else (paper or {}).get(key)
        try:
            nullable = None in (defaults.get(key, 0), (paper or {}).get(key, 0))
            explicit[key] = _typed(key, text, like, nullable)
        except ValueError as e:
            p.error(f"--set {item}: not a value of the setting's type ({type(like).__name__}; {e})")
    for k, v in explicit.items():
        setattr(args, k, v)
    check_args(p, args)
    args.out = args.out or f"runs/{p.script_name}"
    return args


def positive_ints(text):
    """argparse type: comma-separated positive integers, e.g. 1,2,4,8."""
    try:
        v = [int(t) for t in text.split(",")]
        assert v and min(v) > 0
        return v
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"positive comma-separated integers, e.g. 1,2,4,8 (got {text!r})") from None


def check_args(p, args):
    """Argument errors a user can make, reported by argparse (exit 2, no traceback)."""
    if sum([args.train, args.sample, args.eval, args.export is not None]) == 0:
        p.error("say what to do: --train, --sample, --eval or --export (see --help)")
    if args.export is not None and not args.export.endswith(".onnx"):
        p.error(f"--export {args.export}: give a file name ending in .onnx")
    for k in ("limit", "epochs", "max_steps", "batch_size", "n", "reps", "ckpt_every", "val_every"):
        v = getattr(args, k, None)
        if v is not None and v <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive (got {v})")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be positive (got {args.lr})")
    if args.max_test is not None and args.max_test < 0:
        p.error(f"--max-test must be >= 0 (got {args.max_test})")
    if args.train:
        args.detector = args.detector or "neutron"


# flags that may change when a run is resumed; every other one comes from the checkpoint
RESUMABLE = {"epochs", "max_steps", "device", "ckpt_every", "resume", "stage", "train", "sample", "eval", "out", "ckpt", "n",
             "reps", "max_test", "plot", "particles", "smoke", "export", "protocol", "channels"}


def resume_args(args, ckpt):
    """Continue with the checkpoint's configuration (model size, data, lr, ...), keeping only RESUMABLE flags."""
    changed = [k for k, v in ckpt["args"].items() if k not in RESUMABLE and getattr(args, k, v) != v]
    if changed:
        log(f"--resume: using the checkpoint's {', '.join(changed)} (given values ignored)")
    for k, v in ckpt["args"].items():
        if k not in RESUMABLE:
            setattr(args, k, v)
    return args


def log(*a, **k):
    """print, on rank 0 only: under torchrun the other ranks run the same code and stay quiet."""
    if main_process():
        print(*a, **k)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    return torch.device(name)


def seed_everything(seed):
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device, enabled):
    """bf16 autocast where supported (CPU, Ampere+), else fp16 (then the caller needs a GradScaler)."""
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16 if bf16 else torch.float16)


def grad_scaler(amp, device):
    """The loss scaler of fp16 autocast (a GPU without bf16); a no-op otherwise (fp32, bf16)."""
    return torch.amp.GradScaler(enabled=amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())


def noise(shape, generator, device, uniform=False):
    """Standard normal (uniform: U(0, 1)) noise for samplers. With a (CPU) `generator` it is drawn on the CPU and
    moved to `device`, so a seed gives the same samples on any device; with generator=None it is drawn on `device`
    directly, which is what a CUDA graph capture needs (bench.py)."""
    draw = torch.rand if uniform else torch.randn
    if generator is None:
        return draw(shape, device=device)
    return draw(shape, generator=generator, device=generator.device).to(device)


def save_checkpoint(ckpt, path):
    """Atomic save: write a temporary file next to `path`, then rename over it. Under torchrun only rank 0 writes
    (the scripts pass the state_dicts of the plain, unwrapped networks: the file is the same at any world size)."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(dict(ckpt, format=FORMAT), tmp)
    os.replace(tmp, path)


FORMAT = 1   # the checkpoint format of every script; another one is refused with one clear line
OLDER = "75efdae"   # the last commit whose scripts read the checkpoints written before format numbers


def load_checkpoint(path, model, detector=None):
    """Load a checkpoint written by the script `model`; clear errors for a missing, foreign, older or mismatched
    one."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found (train first with --train, or give --ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise DataError(f"{path}: not a checkpoint of this project")
    if ckpt["model"] != model:
        raise DataError(f"{path}: a checkpoint of {ckpt['model']}.py, not of {model}.py")
    if ckpt.get("format") != FORMAT:
        raise DataError(f"{path}: trained by an older version of {model}.py (checkpoint format "
                        f"{ckpt.get('format', 0)}, this one reads {FORMAT}): retrain, or check out commit {OLDER}")
    if detector is not None and ckpt["data"]["detector"] != detector:
        raise DataError(f"{path}: trained on the {ckpt['data']['detector']} detector, but --detector {detector} "
                        "was given (leave --detector out: the checkpoint knows its detector)")
    return ckpt


# Adversarial training does not converge: a GAN's validation score can be best long before its last step
# (`python metrics.py --curve RUN` shows it). The GAN scripts therefore keep, beside the last weights, the
# generator of their best validation score in the same checkpoint; --sample/--eval/--export use it unless
# `--weights last` is given. The selection uses the validation events only, never the test events.
def track_best(best, step, score, model, **info):
    """The best-so-far record: `best` (None or a dict from an earlier call) replaced by this step's generator
    weights (a CPU copy) when `score` (lower is better) beats it. `info` (e.g. the val_W values) is kept with it."""
    if best is not None and not score < best["score"]:
        return best
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return dict(step=int(step), score=float(score), weights=weights, **info)


def pick_weights(ck, which="best"):
    """The generator weights to sample with, and a label for tables: the best-by-validation weights of a GAN
    checkpoint (`which` 'best', the default where present) or its last ones ('last'); checkpoints written before
    best weights were kept have only the last ones."""
    best = ck.get("best")
    if which == "last" or best is None:
        if which == "best" and best is None:
            print(f"note: this checkpoint keeps only its last weights (step {ck['step']})")
        return ck["weights"], f"last, step {ck['step']}"
    return best["weights"], f"best validation, step {best['step']} of {ck['step']}"


# ----------------------------------------------------------------------------------------------------------
# Several processes: torchrun and DistributedDataParallel (DDP)
# ----------------------------------------------------------------------------------------------------------
# `torchrun --nproc_per_node N MODEL.py --train ...` starts N copies of the script (ranks). dist_init() joins
# them (NCCL on CUDA, each rank on cuda:LOCAL_RANK; gloo on CPU); without torchrun it changes nothing.
# How one step is shared, and why N ranks compute exactly what one process computes:
# - every rank draws the SAME global batch (same batch order) and the SAME noise for the whole global batch
#   (every generator has the same seed on every rank): the script's loss code runs unchanged on every rank;
# - a network wrapped by wrap_ddp() runs only on this rank's contiguous shard of each global batch (shard())
#   and hands back the all-gathered output of the whole batch, so the loss is the single-process loss of the
#   global batch on every rank, whatever its form (a mean, a sum, a matching over the batch, pair terms);
# - backward: the gather's gradient is all-reduced (summed) and each rank keeps its own rows, N times its
#   share of the single-process gradient; DDP averages the parameter gradients over the N ranks: the result
#   is the single-process gradient (to float rounding). BatchNorm layers become SyncBatchNorm (batch
#   statistics of the global batch), so they too equal one process.
# - anything not called through a wrapper (a sub-network called directly, an EMA update, a codebook update
#   from gathered outputs) is computed on the whole global batch on every rank, identically.
# Not equal: dropout masks (drawn per rank from the global torch RNG, seeded differently on ranks > 0 so the
# shards do not share masks); float rounding. EMA weights are updated on every rank identically (the same
# averaged gradients give the same weights); rank 0 alone logs, validates, evaluates, shows progress bars and
# writes checkpoints of the plain (unwrapped) weights, which resume at any world size.
Dist = namedtuple("Dist", "rank world local_rank is_main device")
_GATHER = {}   # the process group of the gathers (separate from DDP's, so their collectives never interleave)


def dist_init(device="auto"):
    """Join torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK from the environment); world 1 without it.
    Training code logs through log(), which prints on rank 0 only."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world == 1:
        return Dist(0, 1, 0, True, dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        _GATHER["group"] = torch.distributed.new_group()
    return Dist(rank, world, local, rank == 0, dev)


def _rows(n, dist):
    """This rank's rows [lo, hi) of a global batch of n (shards differ by at most one row when N does not divide n)."""
    return dist.rank * n // dist.world, (dist.rank + 1) * n // dist.world


def shard(x, dist):
    """This rank's contiguous slice of a global batch: a tensor, or a tuple/list of equally long tensors."""
    if isinstance(x, (tuple, list)):
        return type(x)(shard(t, dist) for t in x)
    lo, hi = _rows(len(x), dist)
    return x[lo:hi]


def check_batch(batch_size, dist):
    """--batch-size is the global batch; it must split into equal shards (a last, smaller batch may not)."""
    if batch_size % dist.world:
        raise DataError(f"--batch-size {batch_size} does not split into {dist.world} equal shards: under torchrun "
                        f"it is the global batch, make it a multiple of the number of processes")


class _Gather(torch.autograd.Function):
    """All-gather of the shards along dim 0 (forward); all-reduce (sum) of the gradient, own rows (backward)."""

    @staticmethod
    def forward(ctx, x, n, world):
        group, k = _GATHER["group"], -(-n // world)                      # shards padded to k rows
        pad = x.new_zeros((k,) + x.shape[1:])
        pad[:len(x)] = x
        parts = [torch.empty_like(pad) for _ in range(world)]
        torch.distributed.all_gather(parts, pad, group=group)
        ctx.rows = [(r * n // world, (r + 1) * n // world) for r in range(world)]
        ctx.mine = ctx.rows[torch.distributed.get_rank()]
        return torch.cat([p[:hi - lo] for p, (lo, hi) in zip(parts, ctx.rows)])

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        torch.distributed.all_reduce(g, group=_GATHER["group"])
        return g[ctx.mine[0]:ctx.mine[1]], None, None


class _Sum(torch.autograd.Function):
    """Sum over the ranks, with gradient (the adjoint of an all-reduce sum is an all-reduce sum)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        torch.distributed.all_reduce(x, group=_GATHER["group"])
        return x

    @staticmethod
    def backward(ctx, g):
        return _Sum.forward(ctx, g.contiguous())


class _SyncBatchNormCPU(torch.nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for gloo (torch's runs on GPUs only): batch mean and variance over all ranks' shards."""

    @classmethod
    def convert(cls, module):
        """`module` with every BatchNorm layer replaced by one of these, holding the same parameters and buffers
        (as torch.nn.SyncBatchNorm.convert_sync_batchnorm does for CUDA)."""
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(new, name, getattr(module, name))
            return new.train(module.training)
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module

    def forward(self, x):
        if not self.training:
            return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                                  False, 0.0, self.eps)
        dims, view = [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)
        n = _Sum.apply(x.new_tensor(float(x.numel() // x.shape[1])))
        mean = _Sum.apply(x.sum(dims)) / n
        var = _Sum.apply((x - mean.view(view)).pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
        y = (x - mean.view(view)) * torch.rsqrt(var.view(view) + self.eps)
        return y * self.weight.view(view) + self.bias.view(view) if self.affine else y


class _Methods(torch.nn.Module):
    """DDP runs forward() only; this lets a wrapped network's other methods and sub-networks (net.encode(...),
    net.decoder(...)) run through it: `method` is a dotted path from the network."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, method, *a, **k):
        f = self.net
        for name in method.split("."):
            f = getattr(f, name)
        return f(*a, **k)


class _Part:
    """A sub-network of a Sharded network: calling it runs sharded through DDP; its attributes are the plain ones."""

    def __init__(self, owner, path, module):
        self.owner, self.path, self.module = owner, path, module

    def __call__(self, *a, **k):
        return self.owner.call(self.path, *a, **k)

    def __getattr__(self, name):
        return getattr(self.module, name)


def _map(f, x):
    """f applied to every tensor in nested tuples, lists and dicts."""
    if isinstance(x, (tuple, list)):
        return type(x)(_map(f, v) for v in x)
    if isinstance(x, dict):
        return {k: _map(f, v) for k, v in x.items()}
    return f(x) if torch.is_tensor(x) else x


def _tensors(x):
    out = []
    _map(out.append, x)
    return out


class Sharded(torch.nn.Module):
    """A network under DDP that takes and returns GLOBAL batches and computes only this rank's shard (see above).
    Calls of its methods and sub-networks (net.encode(...), net.decoder(...)) are sharded too; a tensor argument
    is cut when it is as long as the first one (the batch). Other attributes (buffers, a sub-network's methods)
    are the plain ones: what is computed with them is computed on the whole batch on every rank."""

    def __init__(self, net, dist):
        super().__init__()
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        self.ddp, self.dist = torch.nn.parallel.DistributedDataParallel(_Methods(net), device_ids=ids), dist

    def forward(self, *a, **k):
        return self.call("forward", *a, **k)

    def call(self, method, *a, **k):
        n = len(_tensors(a)[0])
        lo, hi = _rows(n, self.dist)
        cut = lambda t: t[lo:hi] if t.dim() and len(t) == n else t   # noqa: E731
        out = self.ddp(method, *_map(cut, a), **_map(cut, k))
        return _map(lambda t: self._gather(t, n, hi - lo), out)

    def _gather(self, out, n, mine):
        if out.dim() == 0:                     # a mean over the shard -> the mean over the global batch
            return _Sum.apply(out * mine) / n
        if len(out) != mine:
            raise ValueError(f"Sharded: an output of shape {tuple(out.shape)} is neither per-sample nor a scalar")
        return _Gather.apply(out, n, self.dist.world)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            attr = getattr(self.ddp.module.net, name)
            if isinstance(attr, torch.nn.Module):
                return _Part(self, name, attr)
            if callable(attr) and not hasattr(torch.nn.Module, name):
                return lambda *a, **k: self.call(name, *a, **k)
            return attr


def wrap_ddp(net, dist):
    """The network for the training step under torchrun: BatchNorm -> SyncBatchNorm, then Sharded(DDP(...)).
    Identity at world 1. Keep the plain network for validation, sampling and checkpoints (or unwrap())."""
    if dist.world == 1:
        return net
    if dist.device.type == "cuda":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)     # in place below the top module
    else:
        net = _SyncBatchNormCPU.convert(net)                         # the same, for gloo on CPUs
    if dist.rank > 0 and not _GATHER.get("reseeded"):          # own dropout masks on every rank (see above)
        torch.manual_seed(torch.initial_seed() + 7919 * dist.rank)
        _GATHER["reseeded"] = True
    return Sharded(net, dist)


def unwrap(net):
    """The plain network inside wrap_ddp()'s wrapper (the network itself at world 1)."""
    return net.ddp.module.net if isinstance(net, Sharded) else net


def main_process():
    """False on the ranks other than 0 of a torchrun job (for code that is not handed the Dist)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def barrier(dist):
    if dist.world > 1:
        torch.distributed.barrier()


def dist_close(dist):
    """End of training: every rank waits for rank 0 (its last validation and checkpoint), then the process group
    closes. Ranks other than 0 exit here: what follows on the command line (--sample, --eval) is rank 0's."""
    if dist.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if not dist.is_main:
            raise SystemExit(0)


# ----------------------------------------------------------------------------------------------------------
# One training run: what every script's train() shares and is not the method
# ----------------------------------------------------------------------------------------------------------
class Run:
    """One training run of a model script: resume, data, epochs and batches, checkpoints, logging, DDP.

    The contract, in the order a train() uses it:
    - `run = Run(args, NAME)`: joins torchrun (if any), seeds, refuses to overwrite a run folder without
      --resume (`resume=True`: continue one anyway), takes the checkpoint's settings on --resume (`run.args`),
      and loads the split (`run.split`).
    - `planned = run.plan(n_train, batch_size, n_params)`: steps per epoch (`drop_last` for BatchNorm models),
      `run.planned` = --epochs' steps (the LR schedules span it), `run.total` (--max-steps may stop earlier).
      A two-stage script plans each stage (`stage=1`, `epochs=...`): each has its own step count and batch
      order, and `run.step` is the current stage's.
    - `run.keep(name=obj, ...)`: what a checkpoint holds: modules, optimisers, schedulers, scalers (anything
      with state_dict) and torch.Generators; restored here on --resume when the checkpoint has them (a stage's
      optimisers: keep them under their own names). `run.extra` (a dict of plain values, e.g. a GAN's best
      weights) is saved, and on --resume restored for the keys it holds when keep() is first called.
    - `net = run.wrap(model)`: the network for the training step (DDP under torchrun, see wrap_ddp).
    - `for batch in run.batches((x, c)):` the training batches on the device, each epoch in a seeded order,
      skipping those a resumed run already trained on. After the optimiser step the script calls
      `run.step_done(name=value, ...)`: it counts the step, stops on a non-finite value, shows progress,
      saves every --ckpt-every steps and at each epoch's end, and every --val-every steps (and at the last)
      writes a metrics.jsonl row (step, epoch, the means of the logged values since the last row, what
      `run.validate()` returns: set it to a function returning a dict; rank 0 only) and prints it.
    - `run.finish()`: closes torchrun's group (the other ranks exit there) and returns the checkpoint path.
    """

    def __init__(self, args, name, resume=False):
        self.dist = dist_init(args.device)
        self.device, self.name = self.dist.device, name
        seed_everything(args.seed)
        self.out = Path(args.out)
        self.path = self.out / "ckpt.pt"
        self.ck, self.kept, self.extra, self.steps, self.stage = None, {}, {}, {}, None
        if self.path.exists() and not (args.resume or resume):
            raise DataError(f"{self.path} exists: pass --resume to continue it, or --out a new folder")
        if self.path.exists():
            self.ck = load_checkpoint(self.path, name)
            args = resume_args(args, self.ck)
            self.steps = dict(self.ck["steps"])
        elif args.resume:
            log(f"--resume: no checkpoint at {self.path}, starting from scratch")
        check_batch(args.batch_size, self.dist)
        self.args, self.validate, self.t0 = args, None, time.time()
        self.split = load_split(vars(args), dist=self.dist)

    @property
    def step(self):
        return self.steps.get(str(self.stage or 1), 0)

    def plan(self, n_train, batch_size, n_params, drop_last=False, about=None, stage=None, epochs=None):
        self.stage, self.epochs = stage, epochs or self.args.epochs
        self.n_train, self.batch_size, self.n_params = n_train, batch_size, n_params
        self.steps_per_epoch = max(n_train // batch_size if drop_last else math.ceil(n_train / batch_size), 1)
        self.planned = self.epochs * self.steps_per_epoch
        self.total = min(self.planned, self.args.max_steps or self.planned)
        self.about = about or f"{n_params:,} parameters"
        return self.planned

    def keep(self, **objects):
        first = not self.kept
        self.kept.update(objects)
        if self.ck is None:
            return
        for k, obj in objects.items():
            if isinstance(obj, torch.Generator) and k in self.ck["rng"]:
                obj.set_state(self.ck["rng"][k])
            elif k in self.ck:
                obj.load_state_dict(self.ck[k])
        if first:
            torch.set_rng_state(self.ck["rng"]["torch"])
            self.extra.update({k: self.ck[k] for k in self.extra})
            log(f"resumed from {self.path} at step {self.step}" + (f" of stage {self.stage}" if self.stage else ""))

    def wrap(self, net):
        return wrap_ddp(net, self.dist)

    def save(self):
        state = {k: o.state_dict() for k, o in self.kept.items() if not isinstance(o, torch.Generator)}
        rng = {k: o.get_state() for k, o in self.kept.items() if isinstance(o, torch.Generator)}
        save_checkpoint(dict(model=self.name, args=vars(self.args), data=self.split.state(), **state,
                             step=self.step, epoch=self.step // self.steps_per_epoch, steps=self.steps,
                             n_params=self.n_params, **self.extra, rng=dict(rng, torch=torch.get_rng_state())),
                        self.path)

    def batches(self, tensors):
        a, spe, stage = self.args, self.steps_per_epoch, self.stage
        log(f"{self.name}{f' stage {stage}' if stage else ''}: {self.about}, {self.n_train:,} training responses, "
            f"{spe} steps per epoch, {self.total} steps in total, device {self.device}, {self.dist.world} process(es)")
        self.t0, self.logged = time.time(), {}
        while self.step < self.total:
            epoch = self.step // spe
            order = torch.Generator().manual_seed(a.seed * 100_003 + 1000 * (stage or 0) + epoch)   # batch order
            skip = self.step - epoch * spe                                  # batches done before a resume
            self.bar = tqdm(batches(tensors, self.batch_size, order, device=self.device, start=skip), total=spe,
                            initial=skip, desc=f"{f'stage {stage} ' if stage else ''}epoch {epoch + 1}/{self.epochs}",
                            leave=False, disable=a.smoke or not self.dist.is_main)
            for i, batch in enumerate(self.bar, skip):
                if i >= spe:                                                # drop_last
                    break
                step = self.step
                yield batch
                if self.step != step + 1:
                    raise RuntimeError("call run.step_done() once after each training step")
                if self.step >= self.total:
                    break
            self.bar.close()
            self.save()

    def step_done(self, **values):
        values = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in values.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"{values} at step {self.step}: training diverged (lower --lr?)")
        self.steps[str(self.stage or 1)] = self.step + 1
        for k, v in values.items():
            self.logged.setdefault(k, []).append(v)
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
        if self.step % self.args.ckpt_every == 0:
            self.save()
        if (self.step % self.args.val_every == 0 or self.step >= self.total) and self.dist.is_main:
            self.bar.clear()
            self.log_row()

    def log_row(self):
        row = dict(**({"stage": self.stage} if self.stage else {}), step=self.step,
                   epoch=self.step / self.steps_per_epoch, **{k: float(np.mean(v)) for k, v in self.logged.items()},
                   **(self.validate() if self.validate else {}), minutes=(time.time() - self.t0) / 60)
        self.logged = {}
        log_jsonl(self.out / "metrics.jsonl", **row)
        log(f"step {self.step:6d}  " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                  if k != "step" and isinstance(v, (int, float))))

    def finish(self):
        log(f"done: {self.step} steps in {(time.time() - self.t0) / 60:.1f} min, checkpoint {self.path}")
        dist_close(self.dist)
        return self.path


def load_split(a, progress=True, dist=None):
    """The data and split described by a dict with keys detector, data, limit, seed, min_photons, split
    (the script's args, or the args stored in a checkpoint). dist: under torchrun rank 0 loads (and generates
    the toy data) first, the other ranks wait for it, then read the cache."""
    if dist is not None and dist.world > 1:
        if not dist.is_main:
            barrier(dist)
        split = load_split(a, dist.is_main)
        if dist.is_main:
            barrier(dist)
        return split
    ds = load(a["detector"], a["data"], a["limit"], a["seed"], a.get("min_photons"), progress)
    return (JointSplit if a["detector"] == "joint" else Split)(ds, a["split"], a["seed"])


def split_from_checkpoint(ckpt, progress=True):
    """Rebuild the training data's split from a checkpoint, checking it is the data the model saw."""
    split = load_split(ckpt["args"], progress)
    if not np.allclose(split.mean, ckpt["data"]["mean"], rtol=1e-6) or not np.allclose(split.std, ckpt["data"]["std"], rtol=1e-6):
        raise DataError(f"the data at {ckpt['args']['data']!r} are not those this checkpoint was trained on "
                        "(feature statistics differ)")
    return split


def sampling_conditions(ckpt, n, particles_file=None):
    """Raw particles (n, 10) to condition on: from a file, or the first n test particles of the checkpoint's data."""
    if particles_file:
        p = _read_npz(Path(particles_file), ["particles", "arr_0"])
        if p.ndim != 2 or p.shape[1] not in (9, 10) or not np.isfinite(p).all():
            raise DataError(f"{particles_file}: particles must be a finite (N, 9) or (N, 10) array, got {p.shape}")
        if p.shape[1] == 9:
            p = np.concatenate([p, np.zeros((len(p), 1))], 1)
        return p[:n].astype(np.float64)
    split = split_from_checkpoint(ckpt)
    test = split.particles("test")
    if n > len(test):
        raise DataError(f"--n {n}: the checkpoint's test split has only {len(test)} particles (use --particles)")
    return test[:n]


def sample_to_file(ckpt, generate, args):
    """--sample: generate(cond, generator) for the first --n test particles of the checkpoint's data (or those in
    --particles), seeded by --seed, and write them as a sample file to --out."""
    particles = sampling_conditions(ckpt, args.n, args.particles)
    cond = standardize(particles, ckpt["data"]["mean"], ckpt["data"]["std"])
    if getattr(generate, "typed", False):            # a model that reads the particle type (PDG id, 10th column)
        if not particles[:, 9].any():
            raise DataError("this model reads the particle type: give --particles with the PDG id as a 10th column")
        cond = with_type(cond, particles)
    g = torch.Generator().manual_seed(args.seed)
    counts = torch.cat([generate(c, g).cpu() for c in torch.split(cond, 1024)])
    out = args.out if args.out.endswith(".npz") else str(Path(args.out) / "samples.npz")
    write_samples(out, counts.numpy(), particles)
    print(f"wrote {len(counts)} responses {tuple(counts.shape[1:])} to {out}")


class Sampler(torch.nn.Module):
    """The one sampler signature of every model script: forward(cond, *noise) -> counts (N, H, W) float32 raw
    photon counts from standardised conditions `cond` (N, 9) and explicit noise tensors, the whole sampler
    (iterative ones unrolled for their steps). A script's Sampler sets `noise_shapes(n)` -> {name: shape} in the
    order forward takes them (the order the script's sampler always drew them from a generator); names in
    `uniform` are U(0, 1), the others N(0, 1); `outputs` names the outputs; `meta` goes into an ONNX export.
    run(cond, generator) draws the noise and calls forward: what each script's sample() does, and bench.py times."""
    outputs, uniform = ("counts",), ()

    def __init__(self, **meta):
        super().__init__()
        self.meta = meta

    def noise_shapes(self, n):
        raise NotImplementedError

    def cond_columns(self):
        """Columns of cond: the 9 features (a model that also reads the particle type adds a 10th, see vae.py)."""
        return len(FEATURES)

    def example_cond(self, n, generator):
        """A random cond of the right form (export and its ONNX check)."""
        return torch.randn(n, len(FEATURES), generator=generator)

    def draw(self, n, generator=None, device="cpu"):
        """{name: noise tensor} for a batch of n (generator=None: drawn on `device`)."""
        return {k: noise(s, generator, device, k in self.uniform) for k, s in self.noise_shapes(n).items()}

    @torch.no_grad()
    def run(self, cond, generator=None):
        if cond.dim() != 2 or cond.shape[1] != self.cond_columns():
            raise DataError(f"cond must be (N, {self.cond_columns()}) standardised features, got {tuple(cond.shape)}")
        return self(cond, *self.draw(len(cond), generator, cond.device).values())


def export_onnx(sampler, ckpt, path, name, batches=(3, 5), seed=0):
    """--export: write `sampler` (a Sampler) as one ONNX graph with named inputs `cond` (N, 9) and its noise
    tensors, outputs `counts` (N, H, W), dynamic batch; metadata: the feature mean/std (so a user can standardise
    raw particles), the detector, the model name and the sampler's settings (steps ...). Then run the file with
    ONNX Runtime and PyTorch on the same cond and noise for batch sizes other than the traced one and print the
    largest absolute and relative difference (relative to the largest count). Returns {batch: (abs, rel)}
    (batches=(): no check, nothing printed; ckpt=None: fresh weights, no feature statistics, as bench.py uses it).
    The TorchScript exporter (dynamo=False) is used: it needs only onnx, where torch.export's exporter also needs
    onnxscript, and it unrolls the samplers' python loops as they are traced."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise DataError(f"--export needs onnx and onnxruntime ({e}): pip install onnx onnxruntime") from None
    import warnings
    torch.onnx.register_custom_op_symbolic(     # to_counts' expm1 has no ONNX op: exp(x) - 1 (1e-7 off near 0)
        "aten::expm1", lambda g, x: g.op("Sub", g.op("Exp", x), g.op("Constant", value_t=torch.tensor(1.0))), 17)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sampler = sampler.cpu().eval().float()
    g = torch.Generator().manual_seed(seed)
    cond = sampler.example_cond(2, g)
    names = ["cond", *sampler.noise_shapes(2)]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)   # nn.MultiheadAttention's fused eval kernel has no ONNX op (vqgan)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")          # deprecation of the TorchScript path; tracer notes on constants
            torch.onnx.export(sampler, (cond, *sampler.draw(2, g).values()), str(path), input_names=names,
                              output_names=list(sampler.outputs), opset_version=17, dynamo=False,
                              dynamic_axes={k: {0: "batch"} for k in names + list(sampler.outputs)})
    finally:                                         # a failed export leaves the process as it found it
        torch.backends.mha.set_fastpath_enabled(fastpath)
    m = onnx.load(str(path))
    stats = {} if ckpt is None else dict(detector=ckpt["data"]["detector"], shape=ckpt["data"].get("shape"),
                                         feature_mean=np.asarray(ckpt["data"]["mean"]).tolist(),
                                         feature_std=np.asarray(ckpt["data"]["std"]).tolist(), train_steps=ckpt.get("step"))
    meta = dict(model=name, features=FEATURES, **stats, inputs={k: list(s[1:]) for k, s in sampler.noise_shapes(1).items()},
                uniform_inputs=list(sampler.uniform), **sampler.meta)
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v if isinstance(v, str) else json.dumps(v))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    diffs = {}
    if not batches:
        return diffs
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in batches:
        cond = sampler.example_cond(n, g)
        nz = sampler.draw(n, g)
        with torch.no_grad():
            ref = sampler(cond, *nz.values())
        ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        out = sess.run(None, {"cond": cond.numpy(), **{k: v.numpy() for k, v in nz.items()}})
        d = max(float(np.abs(o - r).max()) for o, r in zip(out, ref))
        diffs[n] = (d, d / max(max(float(np.abs(r).max()) for r in ref), 1e-12))
    print(f"wrote {path} (inputs {', '.join(names)}; outputs {', '.join(sampler.outputs)}); ONNX Runtime vs PyTorch, "
          "same cond and noise: " + ", ".join(f"batch {n}: max abs diff {a:.3g} counts, max rel {r:.3g}"
                                             for n, (a, r) in diffs.items()))
    return diffs


def write_samples(path, counts, particles):
    """A sample file that load() reads like a real one: responses (N, H, W) raw counts, particles (N, 10)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise DataError(f"--out {path}: sample files are .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, responses=np.asarray(counts, np.float32), particles=np.asarray(particles, np.float64))


def log_jsonl(path, **row):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def generator(sampler, device, amp=False):
    """The (cond, generator) -> counts callable that metrics.evaluate and sample_to_file take."""
    def generate(cond, g):
        with autocast(device, amp):
            return sampler.run(cond.to(device), g).float()
    generate.typed = sampler.cond_columns() > len(FEATURES)
    return generate


def paper_line(script):
    """The line every --paper run starts with: the script's DEVIATIONS (what --paper still does differently from
    the publication), so that nobody mistakes a run for the publication's."""
    dev, doc = getattr(script, "DEVIATIONS", ()), f"docs/fidelity/{script.NAME}.md"
    if not dev:
        return f"--paper: the publication's setting in every respect that {script.NAME}.py controls ({doc})"
    return "--paper differs from the publication in: " + "; ".join(dev) + f" (details: {doc})"


def main(script, argv=None):
    """Every model script's command line: `data.main(sys.modules[__name__])` under `if __name__ == "__main__"`.
    The script provides NAME, get_args(argv), train(args) -> checkpoint path, load_sampler(ck, args, device)
    -> its Sampler with the checkpoint's weights, and evaluate(args, ck, sampler, device); optionally
    write_samples(args, ck, sampler, device) where a sample file is not one response per particle."""
    args = script.get_args(argv)
    if args.paper:
        log(paper_line(script))
    try:
        if args.train:
            args.ckpt = str(script.train(args))
        if not (args.sample or args.eval or args.export):
            return
        ck = load_checkpoint(args.ckpt or Path(args.out) / "ckpt.pt", script.NAME, args.detector)
        device = pick_device(args.device)
        sampler = script.load_sampler(ck, args, device).eval()
        if args.sample and hasattr(script, "write_samples"):        # sdigan_joint: both responses per particle
            script.write_samples(args, ck, sampler, device)
        elif args.sample:
            sample_to_file(ck, generator(sampler, device, args.amp), args)
        if args.eval:
            script.evaluate(args, ck, sampler, device)
        if args.export:
            export_onnx(sampler, ck, args.export, script.NAME)
    except (DataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Generate (and cache) the toy data set, or check a real one.")
    p.add_argument("--data", default="toy", help="'toy' (default), a folder with the real .npz files, or a sample .npz")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy Monte Carlo")
    p.add_argument("--limit", type=int, default=None, help="only the first N events of --detector")
    p.add_argument("--detector", default="neutron", choices=list(SHAPES), help="detector that --limit counts")
    a = p.parse_args()
    try:
        for det in SHAPES if a.limit is None else [a.detector]:
            t0 = time.time()
            ds = load(det, a.data, a.limit, a.seed)
            print(f"{det}: {len(ds)} events, {ds.cond_id.max() + 1} distinct particles, from {ds.source} "
                  f"({time.time() - t0:.1f} s)")
        if a.data == "toy":
            print(f"cache folder: {toy_folder(a.seed, a.limit, a.detector, progress=False)}")
    except DataError as e:
        raise SystemExit(f"error: {e}")
