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
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdigan")
    cli(S, "--train", "--smoke", "--out", out)                          # no --detector: ZP
    return out


def test_smoke_train_sample_eval(run):
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["model"] == "sdigan_proton" and ck["data"]["detector"] == "proton" and ck["step"] == 6
    assert ck["args"]["variant"] == "sdi-int-aux" and {"disc", "aux", "opt_g", "opt_d", "opt_a"} <= ck.keys()
    r = rows(run)[-1]
    assert 0 <= r["d_real"] <= 1 and 0 <= r["d_fake"] <= 1 and 0 <= r["val_empty"] <= 1
    assert all(r[k] >= 0 and np.isfinite(r[k]) for k in ("div_loss", "int_loss", "aux_loss", "aux_real", "val_W"))
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


@pytest.mark.parametrize("argv, message", [(["--eval", "--detector", "neutron"], "proton calorimeter (ZP 56x30) only"),
                                           (["--train", "--width", "3"], "must be even"),
                                           (["--train", "--lambda-div", "-1"], "--lambda-* weights >= 0"),
                                           (["--train", "--betas", "0.5", "1"], "--betas in [0, 1)"),
                                           (["--train", "--variant", "sdi-aux"], "invalid choice")])
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        sdi.get_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_determinism_resume_and_variants(tmp_path):
    a, c, g = tmp_path / "a", tmp_path / "c", tmp_path / "g"
    cli(S, "--train", "--smoke", "--out", a, "--val-every", 2)
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--max-steps", 4)       # "killed" at step 4
    assert losses(c) == losses(a)[:2]                                                  # same seed, same losses
    cli(S, "--train", "--smoke", "--out", c, "--val-every", 2, "--resume")             # continues to step 6
    ka, kc = (torch.load(p / "ckpt.pt", weights_only=True) for p in (a, c))
    assert kc["step"] == 6 and len(losses(a)) == 3 and losses(c) == pytest.approx(losses(a), rel=1e-5)
    for key in ("weights", "disc", "aux"):
        assert_same_weights(weights(a, key), weights(c, key))
    for key in ("opt_g", "opt_d", "opt_a"):
        for p in ka[key]["state"]:
            assert_same_weights(ka[key]["state"][p], kc[key]["state"][p])
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
    # sums of per-pixel std: 3 -> 1, 7 -> 4, 11 -> 0; min-max normalised: 0.25, 1, 0
    np.testing.assert_allclose(sdi.diversity_target(img, cond), [1, 0.25, 0, 0.25, 1, 0.25, 0.25], rtol=1e-6)
    assert sdi.diversity_target(img, np.zeros(7, int)).tolist() == [0.0] * 7   # one condition: nothing to normalise


def test_brightest_pixel_and_shapes():
    img = np.zeros((2, 56, 30))
    img[0, 40, 3], img[1, 0, 29] = 5, 1
    assert sdi.brightest(img).tolist() == [[40, 3], [0, 29]]
    cfg = dict(width=4, d_width=4, aux_width=2, dropout=0.2)
    gen, (disc, aux) = sdi.build_model(cfg).eval(), sdi.build_critics(cfg)
    cond = torch.randn(3, 9)
    x = sdi.sample(gen, cond, torch.Generator().manual_seed(0))
    assert x.shape == (3, 56, 30) and torch.isfinite(x).all() and (x >= 0).all()
    assert torch.equal(x, sdi.sample(gen, cond, torch.Generator().manual_seed(0)))
    logit, feat = disc(data.to_log(x.numpy()), cond)
    assert logit.shape == (3,) and feat.shape == (3, 64) and aux(data.to_log(x.numpy())).shape == (3, 2)
