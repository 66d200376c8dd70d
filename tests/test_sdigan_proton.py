"""sdigan_proton.py through its command line, and its pieces directly."""
import json

import numpy as np
import pytest
import torch

import data
import sdigan_proton as sdi
from helpers import assert_same_weights, check_eval, check_samples, cli, losses, weights

S = "sdigan_proton.py"


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(smoke_run):
    return smoke_run(S)                                          # no --detector: ZP


def test_smoke_train_sample_eval(run):
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["model"] == "sdigan_proton" and ck["data"]["detector"] == "proton" and ck["step"] == 6
    assert ck["args"]["variant"] == "sdi-int-aux" and {"disc", "aux", "opt_g", "opt_d", "opt_a"} <= ck.keys()
    r = rows(run)[-1]
    assert 0 <= r["d_real"] <= 1 and 0 <= r["d_fake"] <= 1 and 0 <= r["val_empty"] <= 1
    assert all(r[k] >= 0 and np.isfinite(r[k]) for k in ("div_loss", "d_img", "int_loss", "aux_loss", "aux_real", "val_W"))
    cli(S, "--sample", "--ckpt", run / "ckpt.pt", "--n", 40, "--out", run / "s.npz")
    check_samples(run / "s.npz", (56, 30), 40)
    cli(S, "--eval", "--ckpt", run / "ckpt.pt", "--max-test", 100, "--reps", 2)
    r = check_eval(run / "eval.json")
    assert r["detector"] == "proton" and r["variant"] == "sdi-int-aux" and r["n_test"] == 100
    assert 0 <= r["model"]["empty"][0] <= 1 and r["model"]["div_err"][0] >= 0     # the paper's extra numbers


def test_clear_errors(run, tmp_path):
    assert "proton calorimeter (ZP 56x30) only" in cli(S, "--train", "--detector", "neutron", ok=False).stderr
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    ck["model"] = "gan"
    torch.save(ck, tmp_path / "gan.pt")
    assert "a checkpoint of gan.py, not of sdigan_proton.py" in cli(S, "--eval", "--ckpt", tmp_path / "gan.pt", ok=False).stderr
    assert "checkpoint not found" in cli(S, "--sample", "--ckpt", tmp_path / "none.pt", ok=False).stderr
    ck["model"] = "sdigan_proton"
    del ck["format"]                                     # a checkpoint from before the teaching redesign
    torch.save(ck, tmp_path / "old.pt")
    assert "trained by an older version of sdigan_proton.py" in cli(S, "--eval", "--ckpt", tmp_path / "old.pt",
                                                                    ok=False).stderr


@pytest.mark.parametrize("argv, message", [(["--eval", "--detector", "neutron"], "proton calorimeter (ZP 56x30) only"),
                                           (["--train", "--set", "width=3"], "must be even"),
                                           (["--train", "--set", "lambda_div=-1"], "lambda_* weights must be >= 0"),
                                           (["--train", "--set", "div_norm=max"], "div_norm is dataset or minmax"),
                                           (["--train", "--set", "d_norm=layer"], "d_norm is batch or none"),
                                           (["--train", "--set", "int_form=mse"], "int_form is eq4 or code"),
                                           (["--train", "--set", "betas=0.5,1"], "betas takes b1,b2 in [0, 1)"),
                                           (["--train", "--set", "dropout=1"], "dropout must be in [0, 1)"),
                                           (["--train", "--set", "d_lr=0"], "d_lr and aux_lr must be positive"),
                                           (["--train", "--set", "lambda_dvi=1"], "unknown setting 'lambda_dvi'"),
                                           (["--train", "--variant", "sdi-aux"], "invalid choice")])
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        sdi.get_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_determinism_resume_and_variants(tmp_path):
    a, c, g = tmp_path / "a", tmp_path / "c", tmp_path / "g"
    cli(S, "--train", "--smoke", "--out", a, "--val-every", 2)
    cli(S, "--train", "--smoke", "--out", c, "--set", "val_every=2", "--max-steps", 4)  # "killed" at step 4
    assert losses(c) == losses(a)[:2]                                                  # same seed, same losses
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--resume")             # continues to step 6
    ka, kc = (torch.load(p / "ckpt.pt", weights_only=True) for p in (a, c))
    assert kc["step"] == 6 and len(losses(a)) == 3 and losses(c) == pytest.approx(losses(a), rel=1e-5)
    for key in ("weights", "disc", "aux"):
        assert_same_weights(weights(a, key), weights(c, key))
    for key in ("opt_g", "opt_d", "opt_a"):
        for p in ka[key]["state"]:
            assert_same_weights(ka[key]["state"][p], kc[key]["state"][p])
    t = tmp_path / "t"                                  # the ablation's seeds: another start, the same data and split
    cli(S, "--train", "--smoke", "--out", t, "--val-every", 2, "--max-steps", 2, "--set", "train_seed=1")
    assert losses(t)[0] != pytest.approx(losses(a)[0], rel=1e-3)
    assert torch.load(t / "ckpt.pt", weights_only=True)["data"] == ka["data"]
    cli(S, "--train", "--smoke", "--out", g, "--variant", "gan", "--max-steps", 2)      # the plain-GAN ablation row
    r = rows(g)[-1]
    assert "d_loss" in r and not {"div_loss", "int_loss", "aux_loss"} & r.keys()


def test_diversity_target_on_hand_made_repeated_conditions():
    img = np.zeros((7, 2, 2))
    cond = np.array([7, 3, 11, 3, 7, 3, 3])          # condition 3: 4 responses, 7: 2 responses, 11: 1 response
    img[[1, 3, 5, 6], 0, 0] = [0, 2, 0, 2]           # condition 3: pixel (0, 0) std 1, pixel (1, 1) constant
    img[[1, 3, 5, 6], 1, 1] = 5
    img[[0, 4], 0, 1] = [0, 6]                       # condition 7: pixel (0, 1) std 3 and pixel (1, 0) std 1
    img[[0, 4], 1, 0] = [2, 4]
    img[2] = [[9, 0], [0, 1]]                        # a single response: std 0
    # sums of per-pixel std (eq. 3): 3 -> 1, 7 -> 4, 11 -> 0; the paper divides by the 7 responses, the code min-max
    np.testing.assert_allclose(sdi.diversity_target(img, cond), np.array([4, 1, 0, 1, 4, 1, 1]) / 7, rtol=1e-6)
    np.testing.assert_allclose(sdi.diversity_target(img, cond, "minmax"), [1, 0.25, 0, 0.25, 1, 0.25, 0.25], rtol=1e-6)
    assert sdi.diversity_target(img, np.zeros(7, int), "minmax").tolist() == [0.0] * 7   # one condition: all 0


def test_sdi_term_on_hand_made_images():
    x1 = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    x2 = torch.tensor([[[[0.0, 0.0], [3.0, 2.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])   # pair 2: the same image
    z1, z2 = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    div = torch.tensor([0.5, 0.2])
    loss, d_img = sdi.sdi_term(x1, x2, z1, z2, div)
    # pair 1: d_I = |1-0| + 0 + |0-3| + 0 = 4, d_z = 1 + 2 + 0 = 3 -> 0.5 / (4/3); pair 2: d_I = 0 -> 0.2 / 1e-5
    assert d_img.tolist() == [4.0, 0.0]
    assert loss.item() == pytest.approx((0.5 / (4 / 3 + 1e-5) + 0.2 / 1e-5) / 2, rel=1e-5)


def test_intensity_term_on_raw_photon_sums():
    counts = torch.tensor([[[3.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [1.0, 0.0]]])   # raw sums 4 and 5
    fake = torch.log1p(counts).unsqueeze(1)                                       # what G outputs
    assert sdi.intensity_term(fake, torch.tensor([10.0, 2.0])).item() == pytest.approx((6 + 3) / 2, rel=1e-5)
    assert sdi.get_args(["--train"]).lambda_int == sdi.get_args(["--train", "--paper"]).lambda_int == 1e-10


def test_paper_f_div_is_min_max_scaled_to_0_1():
    """Sec. 3.2's "[0, 1]" and the code (per-condition std sum / max, then MinMaxScaler): --paper's targets span
    [0, 1]; dividing by the dataset length (the CPU default) gives values ~1/N, a ~200x weaker SDI term."""
    img = np.zeros((6, 2, 2))
    cond = np.array([0, 0, 1, 1, 2, 2])
    img[[0, 1], 0, 0] = [0, 4]                          # condition 0: pixel std 2 -> f_div 2
    img[[2, 3], 1, 1] = [1, 2]                          # condition 1: 0.5; condition 2: two equal responses, 0
    paper = sdi.get_args(["--train", "--paper"])
    np.testing.assert_allclose(sdi.diversity_target(img, cond, paper.div_norm), [1, 1, 0.25, 0.25, 0, 0])
    np.testing.assert_allclose(sdi.diversity_target(img, cond, sdi.get_args(["--train"]).div_norm),
                               np.array([2, 2, 0.5, 0.5, 0, 0]) / 6)


def test_paper_intensity_term_is_the_codes():
    """The authors' code (calculate_intensity_loss): keras MSE of each event's photon sum against the sum of the
    generator's log1p outputs over the whole batch; eq. 4 literally is |photon sums| apart, 1e5x smaller here."""
    counts = torch.tensor([[[3.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [1.0, 0.0]]])
    fake = torch.log1p(counts).unsqueeze(1)
    total = float(torch.log1p(counts).sum())                                     # ln4 + 2 ln2 + 2 ln3 = 4.969
    expect = ((10 - total) ** 2 + (2 - total) ** 2) / 2
    paper = sdi.get_args(["--train", "--paper"])
    assert paper.int_form == "code" and sdi.get_args(["--train"]).int_form == "eq4"
    assert sdi.intensity_term(fake, torch.tensor([10.0, 2.0]), paper.int_form).item() == pytest.approx(expect, rel=1e-5)
    assert expect == pytest.approx(17.06, abs=0.01)                               # not eq. 4's (6 + 3) / 2


def test_paper_run_prints_its_deviations_and_evaluates_as_the_code():
    """DEVIATIONS name what --paper still does differently; --eval --paper scores as evaluate_models_1.py: the
    whole test split, the mean of 5 generations' W, channels 1-4 on (row + col)-odd pixels (utils.py masks)."""
    assert sdi.DEVIATIONS and all(isinstance(d, str) and len(d) <= 110 for d in sdi.DEVIATIONS)
    assert any("intensity" in d for d in sdi.DEVIATIONS)
    a = sdi.get_args(["--eval", "--paper", "--ckpt", "x.pt"])
    assert (a.protocol, a.max_test, a.channels) == ("mean-of-reps", 0, "odd")
    a = sdi.get_args(["--eval", "--ckpt", "x.pt"])
    assert (a.protocol, a.max_test, a.channels) == ("mean-of-reps", 10000, "even")
    assert "intensity term in the code's form" in data.paper_line(sdi)


def test_aux_term_sums_the_two_coordinates():
    pred, target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[4.0, 6.0], [0.0, 1.0]])
    assert sdi.aux_term(pred, target).item() == pytest.approx((9 + 16 + 1) / 2)          # eq. 2, not a mean of 4


def test_sdi_pairs_share_dropout_masks():
    gen = sdi.build_model(dict(width=4, dropout=0.5)).train()
    z, c = torch.randn(3, 10), torch.randn(3, 9)
    out = gen(torch.cat([z, z]), torch.cat([c, c]), paired=True)
    assert (out[:3] - out[3:]).abs().max() < 1e-4 and out.abs().mean() > 0.01   # same noise and mask: d_I = 0
    out = gen(torch.cat([z, z]), torch.cat([c, c]))                      # unpaired: dropout noise alone differs
    assert (out[:3] - out[3:]).abs().mean() > 0.01


def test_paper_setting_and_precedence():
    a = vars(sdi.get_args(["--train", "--paper"]))
    assert (a["epochs"], a["batch_size"], a["lr"], a["d_lr"], a["aux_lr"], a["betas"]) == (350, 128, 1e-4, 1e-5, 1e-4, [0.9, 0.999])
    assert (a["lambda_div"], a["lambda_int"], a["lambda_aux"], a["dropout"], a["div_norm"]) == (0.1, 1e-10, 1e-3, 0.2, "minmax")
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in sdi.build_networks(a).items()}
    # trainable parameters of the authors' Keras networks (sin-gan-proton-aux-reg-1.py), layer by layer
    g = 19 * 256 + 256 + 2 * 256 + 256 * 25600 + 25600 + 2 * 25600 + 128 * 256 * 4 + 256 + 2 * 256 + 256 * 128 * 4 + 128 \
        + 2 * 128 + 128 * 64 * 4 + 64 + 2 * 64 + 64 * 14 + 1
    d = 9 * 32 + 32 + 64 + 32 * 9 * 16 + 16 + 32 + 2313 * 128 + 128 + 256 + 128 * 64 + 64 + 128 + 65
    r = 9 * 32 + 32 + 64 + 32 * 9 * 64 + 64 + 128 + 64 * 9 * 128 + 128 + 256 + 128 * 9 * 256 + 256 + 512 + 256 * 24 * 2 + 2
    assert counts == dict(generator=g, discriminator=d, regressor=r)
    b = sdi.get_args(["--train", "--paper", "--batch-size", "7", "--lr", "0.123", "--set", "width=6",
                      "--set", "lambda_int=0"])
    assert (b.batch_size, b.lr, b.width, b.lambda_int, b.d_lr) == (7, 0.123, 6, 0.0, 1e-5)    # explicit > --paper
    assert (b.max_steps, b.epochs, b.detector, b.variant) == (None, 350, "proton", "sdi-int-aux")
    c = sdi.get_args(["--train", "--set", "d_lr=3e-3"])
    assert (c.d_lr, c.lr, c.width, c.max_steps, c.lambda_div) == (3e-3, 2e-4, 8, 1000, 0.1)   # > CPU default
    assert sdi.get_args(["--train", "--epochs", "2", "--set", "max_steps=none"]).max_steps is None   # whole epochs
    d = sdi.get_args(["--train", "--smoke", "--paper"])
    assert (d.width, d.d_width, d.aux_width, d.max_steps, d.batch_size, d.limit, d.dropout) == (4, 4, 2, 6, 32, 1500, 0.2)


def test_brightest_pixel_and_shapes():
    img = np.zeros((2, 56, 30))
    img[0, 40, 3], img[1, 0, 29] = 5, 1
    assert sdi.brightest(img).tolist() == [[40, 3], [0, 29]]
    nets = sdi.build_networks(dict(width=4, d_width=4, aux_width=2, dropout=0.2, d_norm="batch"))
    gen, disc, aux = nets["generator"].eval(), nets["discriminator"], nets["regressor"]
    cond = torch.randn(3, 9)
    x = sdi.sample(gen, cond, torch.Generator().manual_seed(0))
    assert x.shape == (3, 56, 30) and torch.isfinite(x).all() and (x >= 0).all()
    assert torch.equal(x, sdi.sample(gen, cond, torch.Generator().manual_seed(0)))
    assert disc(data.to_log(x.numpy()), cond).shape == (3,) and aux(data.to_log(x.numpy())).shape == (3, 2)
