"""sdigan_joint.py (one SDI-GAN for ZN and ZP) and the joint data path of data.py (--detector joint)."""
import json

import numpy as np
import pytest
import torch

import data
import metrics
import sdigan_joint as sj
from helpers import assert_same_weights, check_eval, cli, losses, weights

S = "sdigan_joint.py"


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(smoke_run):
    return smoke_run(S)


def test_smoke_train_sample_eval(run):
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["model"] == "sdigan_joint" and ck["data"]["detector"] == "joint" and ck["step"] == 6
    assert ck["data"]["shape"] == {"neutron": [44, 44], "proton": [56, 30]} and {"disc", "opt_g", "opt_d"} <= ck.keys()
    r = rows(run)[-1]
    assert 0 <= r["d_real"] <= 1 and 0 <= r["d_fake"] <= 1
    for det in ("neutron", "proton"):                                 # the SDI and intensity terms, per detector
        assert all(r[k] >= 0 and np.isfinite(r[k]) for k in (f"div_{det}", f"d_img_{det}", f"int_{det}", f"val_W_{det}"))
    cli(S, "--sample", "--ckpt", run / "ckpt.pt", "--n", 40, "--out", run / "s.npz")
    with np.load(run / "s.npz") as f:
        assert f["responses_neutron"].shape == (40, 44, 44) and f["responses_proton"].shape == (40, 56, 30)
        assert f["particles"].shape == (40, 10) and all((f[k] >= 0).all() for k in ("responses_neutron", "responses_proton"))
    back = data.load("joint", run / "s.npz")                          # a joint sample file loads like data
    assert len(back) == 40 and back.images["proton"].shape == (40, 56, 30)
    cli(S, "--eval", "--ckpt", run / "ckpt.pt", "--max-test", 100, "--reps", 2)
    both = json.loads((run / "eval.json").read_text())
    assert set(both) == {"neutron", "proton"}
    for det in ("neutron", "proton"):
        r = check_eval(run / f"eval_{det}.json")                      # the single-detector eval.json format
        assert r["detector"] == det and r["n_test"] == 100 and r == both[det] and r["ms_per_particle"] > 0
        assert "auc" in r["model"] and r["floor"]["below_cut"][0] <= 1


def test_compare_with_separate_models_on_the_same_particles(run, tmp_path, smoke_run):
    smoke_run("gan.py", to=tmp_path / "gan")                  # the model tests' smoke runs of the two scripts
    smoke_run("sdigan_proton.py", to=tmp_path / "sdi")
    cli(S, "--eval", "--ckpt", run / "ckpt.pt", "--max-test", 60, "--reps", 1, "--plot",
        "--compare-ckpt", tmp_path / "gan" / "ckpt.pt", tmp_path / "sdi" / "ckpt.pt")
    pngs = [f"eval_{d}.{k}.png" for d in ("neutron", "proton") for k in ("grid", "hist", "features", "curve")]
    assert all((run / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)   # --plot: the curve from both val_W keys
    for det, model in (("neutron", "gan"), ("proton", "sdigan_proton")):
        r = json.loads((run / f"eval_{det}.json").read_text())
        row = r["separate"][f"{model} (separate)"]
        assert list(r["separate"]) == [f"{model} (separate)"] and np.isfinite(row["W"][0]) and 0 <= row["empty"][0] <= 1
        assert 0 <= row["seen_in_training"][0] <= 1 and row["key"] == model
        d = r["uncertainty"][f"model-{model}"]["W"]                  # paired on the same events, in the bootstrap
        assert d["ci"][0] <= d["value"] <= d["ci"][1] and "W/floor" in r["uncertainty"][model]
        assert f"{model}_sums" in np.load(run / r["sums"]).files
        md = metrics.results_markdown(str(run))                         # its row carries its interval
        assert f"- sdigan_joint ({det} part)-{model}, paired on the same events: W " in md
    bad = cli(S, "--eval", "--ckpt", run / "ckpt.pt", "--compare-ckpt", run / "ckpt.pt", ok=False).stderr
    assert "need a single-detector model" in bad


@pytest.mark.parametrize("argv, message", [(["--train", "--detector", "neutron"], "invalid choice"),
                                           (["--train", "--set", "width=3"], "must be even"),
                                           (["--train", "--set", "lambda_div=-1"], "lambda_* weights must be >= 0"),
                                           (["--train", "--set", "betas=0.5,1"], "betas takes b1,b2 in [0, 1)"),
                                           (["--train", "--set", "d_norm=layer"], "d_norm is batch or none"),
                                           (["--train", "--set", "div_norm=max"], "div_norm is dataset or minmax"),
                                           (["--train", "--set", "d_lr=0"], "d_lr must be positive"),
                                           (["--train", "--set", "aux_lr=1"], "unknown setting 'aux_lr'"),
                                           (["--eval", "--weights", "first"], "invalid choice")])
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        sj.get_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_paper_setting_precedence_and_parameter_counts():
    a = vars(sj.get_args(["--train", "--paper"]))
    assert (a["epochs"], a["batch_size"], a["lr"], a["d_lr"], a["betas"], a["limit"]) == (200, 128, 1e-4, 1e-4, [0.9, 0.999], None)
    assert (a["lambda_div"], a["lambda_int"], a["dropout"], a["d_norm"], a["detector"]) == (0.1, 0.0, 0.2, "batch", "joint")
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in sj.build_networks(a).items()}
    # trainable parameters of the authors' two-output Keras networks (sdi_gan_proton_neutron_2_outputs.py)
    head = lambda k1, k2, k3: 128 * 256 * k1 + 256 + 512 + 256 * 128 * k2 + 128 + 256 + 128 * 64 * k3 + 64 + 128 + 64 * 2 + 1
    g = 17 * 256 + 256 + 512 + 256 * 30720 + 30720 + 61440 + head(12, 12, 8) + head(12, 12, 12)
    branch = 9 * 32 + 32 + 64 + 32 * 9 * 16 + 16 + 32
    d = 2 * branch + (16 * 12 * 12 + 16 * 9 * 19 + 9) * 128 + 128 + 256 + 128 * 64 + 64 + 128 + 64 * 2 + 2
    assert counts == dict(generator=g, discriminator=d)
    b = sj.get_args(["--train", "--paper", "--batch-size", "7", "--lr", "0.123", "--set", "width=6",
                     "--set", "lambda_int=1e-9"])
    assert (b.batch_size, b.lr, b.width, b.lambda_int, b.d_lr) == (7, 0.123, 6, 1e-9, 1e-4)   # explicit > --paper
    assert (b.max_steps, b.epochs, b.val_every) == (None, 200, 100)
    c = sj.get_args(["--train", "--set", "d_lr=3e-3", "--limit", "5000"])
    assert (c.d_lr, c.lr, c.width, c.max_steps, c.limit) == (3e-3, 2e-4, 8, 600, 5000)      # > CPU default
    assert sj.get_args(["--train"]).limit == 150_000 and sj.get_args(["--eval"]).detector == "joint"
    d = sj.get_args(["--train", "--smoke", "--paper"])
    assert (d.width, d.d_width, d.max_steps, d.batch_size, d.limit, d.dropout) == (4, 4, 6, 32, 2000, 0.2)


def test_shapes_and_paired_dropout():
    nets = sj.build_networks(dict(width=4, d_width=4, dropout=0.5, d_norm="none"))
    gen, disc = nets["generator"].train(), nets["discriminator"]
    z, c = torch.randn(3, sj.NOISE), torch.randn(3, 9)
    out = gen(torch.cat([z, z]), torch.cat([c, c]), paired=True)      # SDI pairs share masks in both heads
    for det in ("neutron", "proton"):
        assert (out[det][:3] - out[det][3:]).abs().max() < 1e-4 and out[det].abs().mean() > 0.01
    gen.eval()
    x = sj.sample(gen, c, torch.Generator().manual_seed(0))
    assert x["neutron"].shape == (3, 44, 44) and x["proton"].shape == (3, 56, 30)
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in x.values())
    assert all(torch.equal(x[k], v) for k, v in sj.sample(gen, c, torch.Generator().manual_seed(0)).items())
    assert disc({k: data.to_log(v.numpy()) for k, v in x.items()}, c).shape == (3, 2)   # one logit per detector


def write_pair(folder, pn, pp, n=6):
    rng = np.random.default_rng(0)
    for det, part in (("neutron", pn), ("proton", pp)):
        (folder / det).mkdir(parents=True)
        np.savez(folder / det / data.FILES[det][0], rng.poisson(0.5, (n,) + data.SHAPES[det]).astype(np.uint16))
        np.savez(folder / det / data.FILES[det][1], part)


def test_paper_has_the_codes_terms_no_intensity_and_min_max_f_div(tmp_path):
    """The poster's two-output code (SDI-GAN_proton_neutron_2_outputs.ipynb) has no intensity term and scales
    each detector's f_div with MinMaxScaler to [0, 1]: --paper trains without L_in and with [0, 1] targets."""
    img, cond = np.zeros((4, 2, 2)), np.array([0, 0, 1, 1])
    img[[0, 1], 0, 0] = [0, 4]                                   # condition 0: f_div 2; condition 1: 0
    paper, default = sj.get_args(["--train", "--paper"]), sj.get_args(["--train"])
    assert (paper.lambda_int, paper.div_norm, default.lambda_int, default.div_norm) == (0.0, "minmax", 1e-10, "dataset")
    np.testing.assert_allclose(sj.diversity_target(img, cond, paper.div_norm), [1, 1, 0, 0])
    np.testing.assert_allclose(sj.diversity_target(img, cond, default.div_norm), [0.5, 0.5, 0, 0])
    assert sj.DEVIATIONS and all(len(d) <= 110 for d in sj.DEVIATIONS)
    cli(S, "--train", "--smoke", "--paper", "--out", tmp_path, "--max-steps", 2)
    r = rows(tmp_path)[-1]
    assert {"div_neutron", "div_proton"} <= r.keys() and not {"int_neutron", "int_proton"} & r.keys()


def test_joint_loader_on_hand_made_folders(tmp_path):
    p = data.draw_particles(6, np.random.default_rng(1))
    p[3] = p[1]                                                        # a repeated particle: one condition id
    write_pair(tmp_path / "ok", p, p.copy())
    ds = data.load("joint", tmp_path / "ok")
    assert len(ds) == 6 and ds.images["neutron"].shape == (6, 44, 44) and ds.images["proton"].shape == (6, 56, 30)
    assert ds.cond_id[1] == ds.cond_id[3] and len(set(ds.cond_id)) == 5 and not ds.is_toy
    np.testing.assert_array_equal(ds.views["proton"].particles, p)
    bad = p.copy()
    bad[[2, 4]] = bad[[4, 2]]                                          # rows 2 and 4 swapped: misaligned
    write_pair(tmp_path / "swapped", p, bad)
    with pytest.raises(data.DataError, match="not row-aligned.*first differing row 2"):
        data.load("joint", tmp_path / "swapped")
    write_pair(tmp_path / "short", p, p[:5], n=6)
    with pytest.raises(data.DataError, match="6 responses but 5 particles"):
        data.load("joint", tmp_path / "short")
    err = cli(S, "--train", "--smoke", "--data", tmp_path / "swapped", "--out", tmp_path / "r", ok=False).stderr
    assert "not row-aligned" in err
    with pytest.raises(data.DataError, match="either response passes"):
        data.load("joint", "toy", limit=100, min_photons=5)


def test_toy_joint_set_is_the_union_of_the_two_sets():
    j = data.load("joint", "toy", limit=2000, progress=False)
    n = j.images["neutron"].reshape(len(j), -1).sum(1)
    p = j.images["proton"].reshape(len(j), -1).sum(1)
    assert ((n >= 10) | (p >= 1)).all() and (n < 10).any() and (p < 1).any()   # one response may be empty
    zn = data.load("neutron", "toy", limit=500, progress=False)           # same chunks, same random stream
    k = min(len(zn), (n >= 10).sum())
    assert k >= 300
    np.testing.assert_array_equal(j.images["neutron"][n >= 10][:k], zn.images[:k])
    np.testing.assert_array_equal(j.particles[n >= 10][:k], zn.particles[:k])
    s = data.load_split(dict(detector="joint", data="toy", limit=2000, seed=0, split="disjoint"), progress=False)
    for det in ("neutron", "proton"):                                     # one split for both detectors
        assert all(np.array_equal(s.views[det].idx[k], s.idx[k]) for k in ("train", "val", "test"))
    assert not set(j.cond_id[s.idx["train"]]) & set(j.cond_id[s.idx["test"]])


def test_joint_floor_uses_both_detectors():
    j = data.load("joint", "toy", limit=2000, progress=False)
    sim, below = data.resimulate(j.particles, "joint", seed=5, cut=j.cut)
    n, p = (sim[d].reshape(len(j), -1).sum(1) for d in ("neutron", "proton"))
    passed = (n >= 10) | (p >= 1)                                         # redrawn while neither passes its cut
    assert below <= 2 and passed.sum() == len(j) - below                   # (a rare particle may never pass: counted)
    true_empty = (j.images["proton"].reshape(len(j), -1).sum(1) == 0).mean()
    assert (p == 0).mean() == pytest.approx(true_empty, abs=0.05)          # ZP is empty as often as in the data
    only_p, _ = data.resimulate(j.particles, "proton", seed=5)             # a single-detector floor never is
    assert (only_p.reshape(len(j), -1).sum(1) >= 1).all()
    split = data.JointSplit(j, "random", 0)
    fl = {d: sj.joint_floor(split, d)(split.views[d], 1, None) for d in ("neutron", "proton")}   # ~400 test events
    assert fl["proton"]["empty"][0] == pytest.approx((p == 0).mean(), abs=0.1) and fl["proton"]["empty"][0] > 0.1
    assert all(np.isfinite(fl[d]["W"][0]) for d in ("neutron", "proton"))


def test_determinism_and_resume(tmp_path):
    a, c = tmp_path / "a", tmp_path / "c"
    cli(S, "--train", "--smoke", "--out", a, "--val-every", 2)
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--max-steps", 4)       # "killed" at step 4
    assert losses(c) == losses(a)[:2]                                                  # same seed, same losses
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--resume")             # continues to step 6
    ka, kc = (torch.load(p / "ckpt.pt", weights_only=True) for p in (a, c))
    assert kc["step"] == 6 and len(losses(a)) == 3 and losses(c) == pytest.approx(losses(a), rel=1e-5)
    for key in ("weights", "disc"):
        assert_same_weights(weights(a, key), weights(c, key))
    for key in ("opt_g", "opt_d"):
        for p in ka[key]["state"]:
            assert_same_weights(ka[key]["state"][p], kc[key]["state"][p])
    # the best-by-validation generator: the step whose geometric mean of val W (ZN, ZP) is lowest, kept over a resume
    val = [r for r in rows(a) if "val_W_neutron" in r]
    want = min(val, key=lambda r: np.log(r["val_W_neutron"]) + np.log(r["val_W_proton"]))
    assert [r["step"] for r in val] == [2, 4, 6] and ka["best"]["step"] == kc["best"]["step"] == want["step"]
    assert ka["best"]["val_W_proton"] == pytest.approx(want["val_W_proton"])
    assert_same_weights(ka["best"]["weights"], kc["best"]["weights"])


def test_sampling_uses_the_best_weights_unless_told_otherwise(tmp_path):
    a = tmp_path / "a"
    cli(S, "--train", "--smoke", "--out", a, "--val-every", 2)
    ck = torch.load(a / "ckpt.pt", weights_only=True)
    ck["best"] = data.track_best(None, 3, 0.0, sj.build_model(ck["args"]))   # a different generator, marked best
    torch.save(ck, a / "ckpt.pt")
    out = cli(S, "--sample", "--ckpt", a / "ckpt.pt", "--n", 8, "--out", a / "last.npz", "--weights", "last").stdout
    assert "generator weights: last, step 6" in out and (a / "last.npz").exists()
    assert not (a / "eval.json").exists()                           # --sample alone does not evaluate

    def load(*flags):
        loaded = torch.load(a / "ckpt.pt", weights_only=True)
        sampler = sj.load_sampler(loaded, sj.get_args(["--eval", "--ckpt", str(a / "ckpt.pt"), *flags]), torch.device("cpu"))
        return loaded, sampler.gen
    loaded, gen = load()
    assert loaded["weights_used"] == "best validation, step 3 of 6"
    assert_same_weights(gen.state_dict(), ck["best"]["weights"])
    loaded, gen = load("--weights", "last")
    assert loaded["weights_used"] == "last, step 6"
    assert_same_weights(gen.state_dict(), ck["weights"])
    del ck["format"]                                                 # a checkpoint from before the teaching redesign
    torch.save(ck, a / "ckpt.pt")
    err = cli(S, "--eval", "--ckpt", a / "ckpt.pt", ok=False).stderr
    assert "trained by an older version of sdigan_joint.py" in err


def test_eval_is_the_common_protocol_per_detector(run):
    """Issue 36: each detector's eval goes through metrics.run_eval (a paired bootstrap over test particles, the
    per-event sums, the protocol block) with the joint set's floor; --protocol and --channels apply as elsewhere."""
    cli(S, "--eval", "--ckpt", run / "ckpt.pt", "--max-test", 80, "--reps", 2, "--channels", "odd",
        "--protocol", "pooled")
    for det in ("neutron", "proton"):
        r = json.loads((run / f"eval_{det}.json").read_text())
        assert r["protocol"]["version"] == 2 and r["protocol"]["W"] == "pooled" and r["protocol"]["channels"] == "odd"
        assert r["sums"] == f"eval_{det}.sums.npz" and r["protocol"]["bootstrap"]["draws"] == metrics.N_BOOT
        idx, _, true, recs = metrics.load_sums(run / r["sums"])
        assert len(idx) == 80 and recs["floor"]["sums"].shape == (2, 80, 5) and true.shape == (80, 5)
        u = r["uncertainty"]
        assert u["model"]["W/floor"]["ci"][0] <= u["model"]["W/floor"]["value"] <= u["model"]["W/floor"]["ci"][1]
        assert "W" in u["model-lookup"] and r["floor"]["below_cut"][0] <= 1


def test_the_floor_is_the_joint_re_simulation():
    """The floor of a detector's view re-simulates the joint set (redrawn while neither response passes its cut),
    not that detector alone: its responses are those of data.resimulate(..., 'joint'), seed 10,000 + r."""
    split = data.JointSplit(data.load("joint", "toy", limit=3000, progress=False), "random")
    rec = {}
    fl = sj.joint_floor(split, "proton")(split.views["proton"], 2, 50, record=rec)
    idx = split.idx["test"][:50]
    sim, _ = data.resimulate(split.ds.particles[idx], "joint", 10_001, split.ds.cut)
    np.testing.assert_allclose(rec["sums"][1], metrics.channel_sums(sim["proton"]), rtol=1e-6)
    assert rec["seeds"] == [10_000, 10_001] and fl["W"][0] >= 0
