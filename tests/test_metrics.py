"""metrics.py: known answers for channels, distances and the evaluation protocol."""
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

import data
import metrics
from conftest import ROOT
from helpers import cli


@pytest.mark.parametrize("shape, quad, odd", [((44, 44), 242, 968), ((56, 30), 210, 840)])
def test_channel_masks(shape, quad, odd):
    m = metrics.channel_masks(shape)
    assert m.shape == (5,) + shape
    assert m.reshape(5, -1).sum(1).tolist() == [quad] * 4 + [odd]
    assert (m.sum(0) == 1).all()                                   # every pixel in exactly one channel
    r, c = np.indices(shape)
    assert ((r + c)[m[4]] % 2 == 1).all() and ((r + c)[m[:4].any(0)] % 2 == 0).all()
    h, w = shape[0] // 2, shape[1] // 2
    assert m[0][0, 0] and m[1][0, w + w % 2] and m[2][h, h % 2] and m[3][h, w + (h + w) % 2]  # quadrant corners


def test_channel_sums_of_a_hand_made_image():
    img = np.zeros((1, 44, 44))
    img[0, 0, 0] = 1        # even, top-left      -> channel 1
    img[0, 2, 30] = 10      # even, top-right     -> channel 2
    img[0, 40, 4] = 100     # even, bottom-left   -> channel 3
    img[0, 22, 22] = 1000   # even, bottom-right  -> channel 4
    img[0, 0, 1] = 5        # odd                 -> channel 5
    img[0, 43, 0] = 7       # odd                 -> channel 5
    np.testing.assert_array_equal(metrics.channel_sums(img), [[1, 10, 100, 1000, 12]])
    np.testing.assert_array_equal(metrics.channel_sums(img[:, None]), [[1, 10, 100, 1000, 12]])  # (N, 1, H, W)


@pytest.mark.parametrize("n, m, ints", [(500, 500, False), (700, 311, False), (400, 900, True), (1, 3, False)])
def test_wasserstein_equals_scipy(n, m, ints):
    rng = np.random.default_rng(n + m)
    u, v = rng.exponential(50, (n, 5)), rng.gamma(2, 20, (m, 5)) + 3
    if ints:
        u, v = np.round(u), np.round(v)                            # many ties
    ours = metrics.wasserstein_1d(u, v)
    ref = [wasserstein_distance(u[:, k], v[:, k]) for k in range(5)]
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)
    assert metrics.wasserstein_1d(u[:, 0], v[:, 0]) == pytest.approx(ref[0])


def test_score_known_answers():
    rng = np.random.default_rng(0)
    true = rng.poisson(0.3, (200, 44, 44)).astype(float)
    cid = np.repeat(np.arange(20), 10)
    pdg = np.full(200, 22.0)
    s = metrics.score(true, true, cid, pdg)
    assert s["W"] == 0 and s["MAE"] == 0 and s["RMSE"] == 0 and s["div_err"] == 0 and s["empty"] == 0
    s = metrics.score(true, true + 1, cid, pdg)                    # +1 photon in every pixel
    np.testing.assert_allclose([s[f"W_ch{i}"] for i in range(1, 6)], [242, 242, 242, 242, 968])
    assert s["MAE"] == pytest.approx((4 * 242 + 968) / 5) and s["RMSE"] == pytest.approx(1)
    assert s["W_gamma"] == pytest.approx(s["W"])
    s = metrics.score(true, np.zeros_like(true), cid, pdg)
    assert s["empty"] == 1 and s["div_err"] == pytest.approx(1)    # no spread at all: error 100 %
    with pytest.raises(ValueError, match="NaN"):
        metrics.score(true, true * np.nan, cid, pdg)
    with pytest.raises(ValueError, match="shape"):
        metrics.score(true, true[:, :40], cid, pdg)


def test_diversity_error_known_answer():
    cid = np.array([0, 0, 1, 1])
    true = np.array([0.0, 2.0, 10.0, 14.0])     # per-condition std 1 and 2
    gen = np.array([5.0, 5.0, 0.0, 8.0])        # std 0 and 4
    assert metrics.diversity_error(true, gen, cid) == pytest.approx(((1 + 2) / 2) / 1.5)


@pytest.fixture(scope="module")
def split():
    return data.Split(data.load("neutron", "toy", limit=6000, progress=False), "random", seed=0)


def test_protocol_rows(split):
    true_by_cond = split.ds.images
    fl = metrics.floor(split, reps=2)
    lk = metrics.lookup(split, reps=2)
    assert fl["below_cut"][0] == 0
    assert 0 < fl["W"][0] < 10 and fl["W"][1] > 0                   # fresh seeds: the repetitions differ
    assert 0.6 * fl["W"][0] < lk["W"][0] < 3 * fl["W"][0]           # random split: lookup ~ floor, never closer
    # a generator that returns the true test responses scores exactly 0; an empty one is far off
    idx = split.idx["test"]
    pos = {}

    def perfect(cond, g):
        k = pos.setdefault("k", 0)
        pos["k"] = (k + len(cond)) % len(idx)
        return true_by_cond[idx[k:k + len(cond)]]
    ev = metrics.evaluate(perfect, split, reps=2, batch_size=333, progress=False)
    assert ev["W"] == [0.0, 0.0] and ev["MAE"][0] == 0
    ev = metrics.evaluate(lambda c, g: np.zeros((len(c), 44, 44)), split, reps=1, progress=False)
    assert ev["W"][0] > 10 * fl["W"][0] and ev["empty"][0] == 1
    assert "W/floor" in metrics.table({"floor": fl, "lookup": lk, "zero": ev}, fl)


def test_evaluate_uses_the_generator_seed(split):
    def noisy(cond, g):
        return torch_rand(len(cond), g)
    a = metrics.evaluate(noisy, split, reps=2, seed=5, max_test=300, progress=False)
    b = metrics.evaluate(noisy, split, reps=2, seed=5, max_test=300, progress=False)
    c = metrics.evaluate(noisy, split, reps=2, seed=6, max_test=300, progress=False)
    assert a == b and a["W"] != c["W"]


def torch_rand(n, g):
    import torch
    return torch.rand(n, 44, 44, generator=g) * 3


def test_cli_prints_stats_floor_and_lookup(tmp_path):
    out = cli("metrics.py", "--data", "toy", "--limit", "3000", "--reps", "2", "--plot", tmp_path,
              "--json", tmp_path / "m.json")
    for text in ("neutron calorimeter", "proton calorimeter", "particle mix", "floor (re-simulation)",
                 "lookup (nearest train)", "split 'disjoint'"):
        assert text in out.stdout
    assert (tmp_path / "neutron_grid.png").stat().st_size > 1000 and (tmp_path / "proton_hist.png").exists()
    assert "no such folder" in cli("metrics.py", "--data", tmp_path / "missing", ok=False).stderr


# ----------------------------------------------------------------------------------------------------------
# Shower metrics: features, separation power, FPD / KPD, classifier AUC
# ----------------------------------------------------------------------------------------------------------
def feature(f, name):
    return f[:, metrics.FEATURES.index(name)]


def test_shower_features_of_hand_made_images():
    img = np.zeros((3, 44, 44))
    img[0, 10, 30] = 7                                  # one bright pixel
    img[1, 4, 6], img[1, 4, 10] = 1, 3                  # two pixels in one row (x = 4), y = 6 and 10
    f = metrics.shower_features(img)                    # img[2]: empty
    assert f.shape == (3, 12) and np.isfinite(f).all()
    np.testing.assert_allclose(f[0], [7, 0, 7, 0, 0, 0, 10, 30, 0, 0, 7, 1])  # (10, 30): even, top-right -> ch 2
    assert feature(f, "sum")[1] == 4 and feature(f, "cog_x")[1] == 4 and feature(f, "width_x")[1] == 0
    assert feature(f, "cog_y")[1] == pytest.approx((6 * 1 + 10 * 3) / 4)
    assert feature(f, "width_y")[1] == pytest.approx(np.sqrt((1 * (6 - 9) ** 2 + 3 * (10 - 9) ** 2) / 4))  # sqrt 3
    assert feature(f, "max_px")[1] == 3 and feature(f, "n_lit")[1] == 2
    np.testing.assert_allclose(f[2], [0] * 6 + [21.5, 21.5, 0, 0, 0, 0])     # empty: centre, no NaN
    fp = metrics.shower_features(np.zeros((1, 56, 30)))
    assert feature(fp, "cog_x")[0] == 27.5 and feature(fp, "cog_y")[0] == 14.5


def test_separation_power_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1000, 3))
    np.testing.assert_allclose(metrics.separation_power(a, a), 0, atol=1e-15)
    np.testing.assert_allclose(metrics.separation_power(a, a + 100), 1)          # disjoint: overflow bin
    np.testing.assert_allclose(metrics.separation_power(a, a - 100), 1)          # underflow bin
    half = np.r_[a[:500], a[:500] + 100]                                        # half in the overflow bin
    # p = true fractions, q = half of them + 0.5 in the overflow: 1/2 [sum (p/2)^2 / (3p/2) + 0.25 / 0.5]
    np.testing.assert_allclose(metrics.separation_power(a[:500], half), 0.5 * (1 / 6 + 0.5), rtol=1e-12)


def test_frechet_distance_of_two_gaussians_against_the_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal([0, 1, 2], [1, 2, 0.5], size=(400_000, 3))
    y = rng.normal([1, 1, 0], [2, 1, 0.5], size=(400_000, 3))
    # diagonal covariances: |mu_x - mu_y|^2 + sum (sx - sy)^2 over the standard deviations
    closed = (1 + 0 + 4) + ((1 - 2) ** 2 + (2 - 1) ** 2 + 0)
    assert metrics.frechet_distance(x, y) == pytest.approx(closed, rel=0.01)
    assert metrics.frechet_distance(x, x) == pytest.approx(0, abs=1e-8)


def test_kernel_distance_sees_a_shift():
    """Unbiasedness (and the paired estimator) is checked against planted bugs in test_metrics_protocol.py."""
    rng = np.random.default_rng(2)
    x, x2 = rng.normal(size=(2000, 12)), rng.normal(size=(2000, 12))
    same, shifted = metrics.kernel_distance(x, x2), metrics.kernel_distance(x, x2 + 0.5)
    assert 20 * abs(same) < shifted


def test_auc_known_answer():
    assert metrics.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert metrics.auc([0, 1], [0.3, 0.3]) == 0.5 and metrics.auc([1, 0], [0.9, 0.1]) == 1.0


@pytest.fixture(scope="module")
def showers():
    ds = data.load("neutron", "toy", limit=10_000, progress=False)
    sp = data.Split(ds, "random", seed=0)
    idx, true, cond = metrics.test_part(sp)
    sim, _ = data.resimulate(ds.particles[idx], "neutron", 7, ds.cut)
    return true[:2000].astype(np.float64), sim[:2000].astype(np.float64), cond.numpy()[:2000]


def test_classifier_is_calibrated_and_sees_a_shift(showers):
    true, sim, cond = showers
    assert len(true) == 2000
    ft, fs = metrics.shower_features(true), metrics.shower_features(sim)
    # an independent re-simulation of the same particles: the same distribution
    assert metrics.classifier_auc(ft, fs, cond, seed=0) == pytest.approx(0.5, abs=0.05)
    moved = np.zeros_like(sim)
    moved[:, 3:] = sim[:, :-3]                                     # every shower moved by 3 fibres in x
    assert metrics.classifier_auc(ft, metrics.shower_features(moved), cond, seed=0) > 0.9


def test_shower_scores_rank_a_blur_below_the_floor(showers):
    true, sim, cond = showers
    same = metrics.shower_scores(true, true, cond)
    assert same["separation"] == 0 and same["fpd"] == pytest.approx(0, abs=1e-8) and same["auc"] == 0.5
    assert abs(same["kpd"]) < 0.01
    floor = metrics.shower_scores(true, sim, cond)
    import torch
    blur = torch.nn.functional.avg_pool2d(torch.tensor(sim)[:, None], 5, 1, 2)[:, 0].numpy()   # smooth blobs
    blurred = metrics.shower_scores(true, blur, cond)
    assert blur.sum() == pytest.approx(sim.sum(), rel=0.05)         # about the same light
    for k in ("separation", "fpd", "kpd", "auc"):
        assert blurred[k] > floor[k] + 0.05, k
    assert floor["auc"] < 0.56 and blurred["auc"] > 0.9


def test_training_curve_is_read_and_plotted(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 10, "loss": 1.0}, {"step": 500, "val_W": 40.0}, {"step": 1000, "val_W": 12.5},
            {"step": 1000, "val_W_zn": 9.0, "val_W_zp": 0.7}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = metrics.read_curve(run)
    assert [r["step"] for r in got] == [500, 1000, 1000]       # the loss-only row is not a validation row
    out = tmp_path / "c.png"
    metrics.main(["--curve", str(run), "--out", str(out)])
    assert out.stat().st_size > 1000


def test_training_curve_errors_name_the_problem(tmp_path):
    with pytest.raises(SystemExit, match="no training log"):
        metrics.main(["--curve", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.png")])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(SystemExit, match="no validation rows"):
        metrics.main(["--curve", str(tmp_path), "--out", str(tmp_path / "c.png")])


def test_sweep_table_known_answer_and_errors(tmp_path):
    rows = [dict(solver="euler", steps=8, W=[4.0, 0.4], MAE=[17.0, 0.1], ms_per_sample=3.0),
            dict(solver="midpoint", steps=2, W=[3.0, 0.2], MAE=[16.0, 0.1], ms_per_sample=2.0)]
    f = tmp_path / "sweep.json"
    f.write_text(json.dumps(dict(rows=rows, floor=dict(W=[2.0, 0.1]), detector="neutron", split="disjoint",
                                 n_test=2000, reps=5, batch=256, threads=2, command="latent_fm.py --eval --sweep 2,8")))
    md = metrics.sweep_markdown([f])
    assert "| euler | 8 | 8 | 4.00 ± 0.40 | 2.00 | 17.00 | 3.00 |" in md
    assert "| midpoint | 2 | 4 | 3.00 ± 0.20 | 1.50 | 16.00 | 2.00 |" in md            # NFE: 2 calls per midpoint step
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps(dict(W=[1, 0])))
    r = subprocess.run([sys.executable, "metrics.py", "--sweep-table", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "not a sweep.json" in r.stderr and "Traceback" not in r.stderr
