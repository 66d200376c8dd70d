"""bench.py on tiny settings: the CPU path end to end, its FLOP counting, and the CUDA-graph fallback."""
import json

import torch

import bench
import flow_matching as fm
from helpers import cli

MODELS = bench.MODELS


def test_cpu_table_end_to_end(tmp_path):
    cli("flow_matching.py", "--train", "--smoke", "--out", tmp_path / "runs" / "flow_matching")   # one trained model
    out = tmp_path / "b.json"
    cli("bench.py", "--models", ",".join(MODELS), "--batch", 4, "--steps", "1,2", "--repeats", 1,
        "--device", "cpu", "--runs", tmp_path / "runs", "--json", out)
    r = json.loads(out.read_text())
    rows = [x for x in r["rows"] if x["model"] in MODELS]
    assert r["threads"] >= 1 and r["peak_flops"]["fp32_matmul_measured"] > 0
    for name in MODELS:
        mine = [x for x in rows if x["model"] == name]
        want = 2 * 2 if name in bench.ITERATIVE else 2                # (steps 1, 2) x (eager, inference)
        assert len(mine) == want, name
        for x in mine:
            assert x["ms_per_sample"] > 0 and x["samples_per_s"] > 0 and x["batch"] == 4 and x["params"] > 0
            assert x["flops_per_sample"] > 0 and 0 < x["peak_fraction"] < 1.5
        if name in bench.ITERATIVE:
            f = {x["steps"]: x["flops_per_sample"] for x in mine}
            assert f[2] > f[1]                                             # two steps cost more than one
    fm_rows = [x for x in rows if x["model"] == "flow_matching"]
    assert all(x["weights"].endswith("flow_matching/ckpt.pt") for x in fm_rows)   # the checkpoint was used
    assert fm_rows[0]["params"] == sum(p.numel() for p in fm.build_model(dict(width=2, attn_levels=1)).parameters())
    assert all(x["weights"] == "fresh weights" for x in rows if x["model"] == "latent_fm")
    toy = [x for x in r["rows"] if x["model"].startswith("toy MC")]
    assert len(toy) == 1 and toy[0]["ms_per_sample"] > 0


def test_flop_counter_known_answer():
    w = torch.randn(9, 32)
    assert bench.flops_per_sample(lambda c: c @ w, torch.randn(8, 9)) == 2 * 9 * 32


def test_cuda_graph_falls_back_cleanly_without_a_gpu():
    fn, why = bench.cuda_graph(lambda c: c * 2, torch.randn(4, 9))
    assert fn is None and "CUDA" in why


def test_bad_flags():
    assert "unknown ['nope']" in cli("bench.py", "--models", "nope", ok=False).stderr
    assert "positive comma-separated" in cli("bench.py", "--batch", "0", ok=False).stderr
    assert "positive comma-separated" in cli("bench.py", "--steps", "a", ok=False).stderr
