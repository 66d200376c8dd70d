"""data.py: the toy simulator's physics and statistics, the loader, validation, splits."""
import numpy as np
import pytest
import torch

import data
import metrics

N_CHUNKS = 100  # 1,600 distinct particles, 272k events: a few seconds


@pytest.fixture(scope="module")
def toy():
    return data.generate_toy(seed=0, n_chunks=N_CHUNKS, progress=False)


def ds_of(toy, det):
    return data.ZDCData(*toy[det], det, "toy(test)")


def particle(name, E, px=0.0, py=0.0, n=1):
    """n copies of one particle aimed with transverse momentum (px, py) GeV."""
    _, pdg, mass, charge, _, _ = next(p for p in data.PARTICLES if p[0] == name)
    m = mass / 1000
    pz = np.sqrt(E**2 - m**2 - px**2 - py**2)
    return np.tile([E, 0, 0, 0, px, py, pz, mass, charge, pdg], (n, 1))


def sums(images):
    return images.reshape(len(images), -1).sum(1).astype(float)


# ---------------------------------------------------------------- statistics against DATA.md's targets
def test_particle_mix_of_neutron_set(toy):
    pdg = toy["neutron"][1][:, 9]
    frac = {name: np.mean(pdg == code) for name, code, *_ in data.PARTICLES}
    assert 0.52 < frac["gamma"] < 0.72          # published 61 %
    assert 0.15 < frac["n"] < 0.32              # 23 %
    assert 0.02 < frac["p"] < 0.10              # 5 %
    assert 0.03 < frac["Lambda"] + frac["K0S"] + frac["K0L"] < 0.12  # 3 + 2 + 2 %
    assert len(np.unique(pdg)) >= 6             # a real mix (charged ones mostly bend away from ZN)
    assert all(f < 0.03 for k, f in frac.items() if k not in ("gamma", "n", "p", "Lambda", "K0S", "K0L"))


def test_sparsity_and_photon_sums(toy):
    zn, zp = toy["neutron"][0], toy["proton"][0]
    assert np.mean(zn == 0) > 0.95 and np.mean(zp == 0) > 0.98   # >= 96 % and ~99 % zeros
    q = np.percentile(sums(zn), [25, 50, 75])                     # published 12 / 111 / 510
    assert 5 <= q[0] <= 60 and 50 <= q[1] <= 250 and 200 <= q[2] <= 1000
    q = np.percentile(sums(zp), [25, 50, 75])                     # published 2 / 5 / 18
    assert 1 <= q[0] <= 5 and 1 <= q[1] <= 12 and 5 <= q[2] <= 60
    assert sums(zn).min() >= 10 and sums(zp).min() >= 1           # the sets' photon cuts
    assert 1500 < sums(zn).max() < 6000 and 300 < zn.max() < 1500


def test_feature_distributions(toy):
    p = toy["neutron"][1]
    q = np.percentile(p[:, 0], [25, 50, 75])                      # published ~200 / 550 / 1600 GeV
    assert 100 < q[0] < 400 and 300 < q[1] < 1000 and 800 < q[2] < 3000
    assert p[:, 0].min() >= 1 and p[:, 0].max() <= 7000
    assert 0.01 < np.mean(p[:, 0] > 6900) < 0.2                   # a small 7 TeV bump
    assert 0.1 < p[:, 4].std() < 0.6 and 0.1 < p[:, 5].std() < 0.6
    assert np.mean(p[:, 1] == 0) > 0.2 and np.abs(p[:, 1]).max() < 1e-3 and np.abs(p[:, 3]).max() < 0.2
    assert (p[:, 6] > 0).any() and (p[:, 6] < 0).any()            # both sides


def test_repeated_conditions(toy):
    ds = ds_of(toy, "neutron")
    n_cond = ds.cond_id.max() + 1
    assert 100 < n_cond < N_CHUNKS * data.TOY["chunk"]
    assert len(ds) / n_cond > 50                                  # ~170 runs per particle in the real set


def test_hadrons_fluctuate_more_than_photons(toy):
    spread = metrics.per_condition_spread(ds_of(toy, "neutron"))
    assert spread["gamma"] < 0.3                                  # published ~0.1-0.3
    assert 0.3 < spread["n"] < 0.7                                # ~0.4-0.6
    assert spread["Lambda/K0"] > spread["n"] + 0.1 > spread["gamma"] + 0.2


def test_toy_is_deterministic_and_prefix_stable():
    a = data.generate_toy(seed=3, n_chunks=3, progress=False)
    b = data.generate_toy(seed=3, n_chunks=3, progress=False)
    c = data.generate_toy(seed=3, n_chunks=2, progress=False)
    d = data.generate_toy(seed=4, n_chunks=2, progress=False)
    for det in data.SHAPES:
        np.testing.assert_array_equal(a[det][0], b[det][0])
        np.testing.assert_array_equal(a[det][1][:len(c[det][1])], c[det][1])  # limit = prefix of the full set
        assert not np.array_equal(c[det][1][:5], d[det][1][:5])


# ---------------------------------------------------------------- geometry and shower physics
def test_straight_neutral_hits_zn_centre():
    img = data.simulate(particle("gamma", 1000.0, n=50), np.random.default_rng(0))
    zn = img["neutron"].sum(0).astype(float)
    r, c = np.indices(zn.shape)
    assert abs((zn * r).sum() / zn.sum() - 21.5) < 0.5 and abs((zn * c).sum() / zn.sum() - 21.5) < 0.5
    assert sums(img["neutron"]).mean() > 0.8 * 0.58 * 1000        # ~0.58 photons / GeV, mostly contained
    assert sums(img["proton"]).mean() < 5


def test_positive_charge_bends_to_zp_negative_away():
    img = data.simulate(particle("p", 3000.0, n=50), np.random.default_rng(0))
    assert sums(img["neutron"]).mean() < 1 and sums(img["proton"]).mean() > 200
    zp = img["proton"].sum(0).astype(float)
    row = (zp.sum(1) * np.arange(56)).sum() / zp.sum()
    assert abs(row - (66.0 / 3.0 - 13.15) / 0.4) < 3              # x = K q / p, row 0 nearest the beam
    img = data.simulate(particle("pi-", 3000.0, n=50), np.random.default_rng(0))
    assert sums(img["neutron"]).sum() == 0 and sums(img["proton"]).sum() == 0


def test_edge_hits_lose_light():
    rng = np.random.default_rng(0)
    px_edge = 3.52 / 11260 * 1000.0                                # aims at the ZN edge
    centre = sums(data.simulate(particle("gamma", 1000.0, n=200), rng)["neutron"]).mean()
    edge = sums(data.simulate(particle("gamma", 1000.0, px=px_edge, n=200), rng)["neutron"]).mean()
    assert 0.35 < edge / centre < 0.65


def test_em_showers_reproducible_hadronic_not():
    rng = np.random.default_rng(0)
    g = sums(data.simulate(particle("gamma", 1000.0, n=300), rng)["neutron"])
    n = sums(data.simulate(particle("n", 1000.0, n=300), rng)["neutron"])
    assert g.std() / g.mean() < 0.08                               # Poisson + 3 %
    assert n.std() / n.mean() > 0.25
    assert 0.2 < n.mean() / 1000 < 0.45                            # ~0.40 photons / GeV before leakage


def test_resimulate_respects_the_cut_and_is_seeded():
    p = particle("n", 300.0, px=0.1, n=100)                       # lands 2 mm off the edge: often below the cut
    a, below = data.resimulate(p, "neutron", seed=1)
    assert below == 0 and sums(a).min() >= 10
    b, _ = data.resimulate(p, "neutron", seed=1)
    c, _ = data.resimulate(p, "neutron", seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_type_from_mass_and_charge_when_pdg_missing():
    p = np.concatenate([particle("gamma", 10.0), particle("n", 10.0), particle("p", 10.0)])
    assert [data.PARTICLES[i][0] for i in data.type_index(p[:, :9])] == ["gamma", "n", "p"]
    bad = p[:1, :9].copy()
    bad[0, 7] = 12345.0
    with pytest.raises(data.DataError, match="matches none"):
        data.type_index(bad)


# ---------------------------------------------------------------- files, loader, validation
def test_toy_files_round_trip(tmp_path):
    ds = data.load("neutron", "toy", limit=2000, progress=False)
    assert len(ds) == 2000 and ds.images.shape == (2000, 44, 44) and ds.particles.shape == (2000, 10)
    folder = data.toy_folder(0, 2000, "neutron", progress=False)
    for det in data.SHAPES:                                        # the real file format, both detectors
        resp = np.load(folder / det / data.FILES[det][0])["arr_0"]
        assert resp.shape[1:] == data.SHAPES[det] and np.issubdtype(resp.dtype, np.integer)
    # a folder with the real names, 9-column particles (no PDG id)
    np.savez(tmp_path / "data_nonrandom_responses.npz", ds.images.astype(np.int64))
    np.savez(tmp_path / "data_nonrandom_particles.npz", ds.particles[:, :9])
    real = data.load("neutron", tmp_path, progress=False)
    assert ds.is_toy and not real.is_toy                             # real data never get a simulated floor
    np.testing.assert_array_equal(real.images, ds.images)
    np.testing.assert_array_equal(real.particles[:, 9], ds.particles[:, 9])  # PDG inferred from mass, charge
    np.testing.assert_array_equal(real.cond_id, ds.cond_id)
    # a sample file as written by --sample
    np.savez(tmp_path / "samples.npz", responses=ds.images[:50].astype(np.float32) + 0.5, particles=ds.particles[:50])
    smp = data.load("neutron", tmp_path / "samples.npz")
    assert len(smp) == 50 and smp.images.dtype == np.float32


def test_load_limit_is_prefix_of_cached_set():
    a = data.load("proton", "toy", limit=500, progress=False)
    b = data.load("proton", "toy", limit=300, progress=False)
    np.testing.assert_array_equal(a.images[:300], b.images)


def write_pair(folder, images, particles):
    folder.mkdir(exist_ok=True)
    np.savez(folder / "data_nonrandom_responses.npz", images)
    np.savez(folder / "data_nonrandom_particles.npz", particles)
    return folder


GOOD_P = np.tile([100.0, 0, 0, 0, 0.1, 0.1, 100.0, 0.0, 0.0, 22], (4, 1))


@pytest.mark.parametrize("images, particles, message", [
    (np.zeros((4, 56, 30)), GOOD_P, r"shape \(4, 56, 30\).*use --detector proton"),
    (np.zeros((4, 44, 44)), GOOD_P[:3], "4 responses but 3 particles"),
    (np.zeros((4, 44, 44)), GOOD_P[:, :7], r"particles have shape \(4, 7\)"),
    (np.full((4, 44, 44), np.nan), GOOD_P, "NaN or inf"),
    (-np.ones((4, 44, 44)), GOOD_P, "negative photon counts"),
    (np.zeros((4, 44, 44)), np.where(np.eye(4, 10) > 0, np.nan, GOOD_P), "particles contain NaN"),
    (np.zeros((0, 44, 44)), GOOD_P[:0], "empty"),
])
def test_bad_files_raise_clear_errors(tmp_path, images, particles, message):
    folder = write_pair(tmp_path / "d", images, particles)
    with pytest.raises(data.DataError, match=message) as e:
        data.load("neutron", folder)
    assert str(folder) in str(e.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(data.DataError, match="no such folder"):
        data.load("neutron", tmp_path / "nope")
    with pytest.raises(data.DataError, match="expected data_nonrandom_responses.npz"):
        data.load("neutron", tmp_path)
    np.savez(tmp_path / "data_nonrandom_responses.npz", np.zeros((4, 44, 44)))
    with pytest.raises(data.DataError, match="data_nonrandom_particles.npz: file not found"):
        data.load("neutron", tmp_path)
    (tmp_path / "x.npz").write_text("not a zip")
    with pytest.raises(data.DataError, match="x.npz: cannot be read"):
        data.load("neutron", tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", foo=np.zeros(3))
    with pytest.raises(data.DataError, match="no array named responses"):
        data.load("neutron", tmp_path / "y.npz")
    with pytest.raises(data.DataError, match="unknown detector"):
        data.load("zdc", "toy")


# ---------------------------------------------------------------- splits, preprocessing, batches
def test_splits(toy):
    ds = ds_of(toy, "neutron")
    r = data.split_indices(ds.cond_id, "random", seed=0)
    assert [len(r[k]) for k in ("train", "val", "test")] == pytest.approx([0.7 * len(ds), 0.1 * len(ds), 0.2 * len(ds)], abs=2)
    assert len(np.unique(np.concatenate(list(r.values())))) == len(ds)
    assert len(np.intersect1d(ds.cond_id[r["train"]], ds.cond_id[r["test"]])) > 0.9 * len(np.unique(ds.cond_id[r["test"]]))
    d = data.split_indices(ds.cond_id, "disjoint", seed=0)
    assert len(np.unique(np.concatenate(list(d.values())))) == len(ds)
    assert len(np.intersect1d(ds.cond_id[d["train"]], ds.cond_id[d["test"]])) == 0
    assert len(np.intersect1d(ds.cond_id[d["val"]], ds.cond_id[d["test"]])) == 0
    np.testing.assert_array_equal(d["test"], data.split_indices(ds.cond_id, "disjoint", seed=0)["test"])
    assert not np.array_equal(r["test"], data.split_indices(ds.cond_id, "random", seed=1)["test"])
    with pytest.raises(data.DataError, match="unknown split mode"):
        data.split_indices(ds.cond_id, "bogus")


def test_preprocessing_and_batches(toy):
    split = data.Split(ds_of(toy, "neutron"), "random", seed=0)
    c = split.cond("train")
    assert c.shape[1] == 9 and c.dtype == torch.float32
    assert torch.allclose(c.double().mean(0), torch.zeros(9, dtype=torch.float64), atol=1e-4)
    x = split.x("val")
    assert x.shape[1:] == (1, 44, 44) and torch.allclose(data.to_counts(x).round(), torch.as_tensor(split.counts("val"), dtype=torch.float32))
    assert data.to_counts(torch.tensor([[-1.0, 2.0]])).min() == 0
    s = split.state()
    assert s["split"] == "random" and len(s["mean"]) == 9
    seen = torch.cat([b[1] for b in data.batches((x, torch.arange(len(x))), 1000, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(len(x)))


def test_min_photons_cut_applies_to_data_and_floor():
    ds = data.load("proton", "toy", limit=3000, min_photons=5, progress=False)
    assert sums(ds.images).min() >= 5 and ds.cut == 5
    sim, below = data.resimulate(ds.particles[:200], "proton", seed=0, cut=ds.cut)
    assert below == 0 and sums(sim).min() >= 5


def test_track_best_keeps_a_copy_of_the_lowest_score():
    net = torch.nn.Linear(2, 1)
    best = None
    for step, score in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 1.0)):           # a tie does not replace the first
        with torch.no_grad():
            net.weight.fill_(step)
        best = data.track_best(best, step, score, net, val_W=score)
    assert best["step"] == 2 and best["score"] == 1.0 and best["val_W"] == 1.0
    assert (best["weights"]["weight"] == 2).all() and (net.weight == 4).all()   # a copy, not a view
    ck = dict(step=4, weights=net.state_dict(), best=best)
    assert data.pick_weights(ck)[1] == "best validation, step 2 of 4"
    w, label = data.pick_weights(ck, "last")
    assert label == "last, step 4" and (w["weight"] == 4).all()


@pytest.mark.parametrize("lam", [0.0, 0.05, 1.0, 5.0, 11.9, 12.0, 40.0, 400.0])
def test_poisson_counts_from_explicit_noise_have_the_poisson_law(lam):
    g = torch.Generator().manual_seed(0)
    mean = torch.full((100_000,), lam)
    u, z = torch.rand(mean.shape, generator=g), torch.randn(mean.shape, generator=g)
    k = data.poisson_counts(mean, u, z)
    assert torch.equal(k, data.poisson_counts(mean, u, z)) and torch.equal(k, k.round()) and (k >= 0).all()
    sd = max(lam, 1e-3) ** 0.5
    assert abs(k.mean().item() - lam) < 5 * sd / 100_000 ** 0.5 + 1e-3         # Poisson mean ...
    assert abs(k.var().item() - lam) < 0.03 * lam + 1e-3                        # ... and variance
    if lam <= 5:                                                                # the exact inverse CDF below 12
        ref = torch.poisson(mean, generator=g)
        for j in range(4):
            assert abs((k == j).float().mean() - (ref == j).float().mean()) < 0.006
