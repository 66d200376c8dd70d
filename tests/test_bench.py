"""bench.py on tiny settings: the CPU path end to end, its FLOP counting, and the CUDA-graph fallback."""
import json
from pathlib import Path

import pytest
import torch

import bench
import flow_matching as fm
from helpers import cli

# the end-to-end table times a single-pass, an adversarial and an iterative model: all eight took ~8 min on 2 busy
# cores (VQ-GAN's 121 autoregressive steps alone ~3.7 min), too slow for the suite; bench.MODELS are all importable
MODELS = ["vae", "gan", "flow_matching"]


def test_cpu_table_end_to_end(tmp_path, smoke_run):
    smoke_run("flow_matching.py", to=tmp_path / "runs" / "flow_matching")   # one trained model
    out = tmp_path / "b.json"
    cli("bench.py", "--models", ",".join(MODELS), "--batch", 4, "--steps", "1,2", "--repeats", 1,
        "--device", "cpu", "--runs", tmp_path / "runs", "--json", out)
    r = json.loads(out.read_text())
    rows = [x for x in r["rows"] if x["model"] in MODELS]
    assert r["threads"] >= 1 and r["peak_flops"]["fp32_matmul_measured"] > 0
    for name in MODELS:
        mine = [x for x in rows if x["model"] == name]
        want = 2 * 3 if name in bench.ITERATIVE else 3                # (steps 1, 2) x (eager, inference, bf16)
        assert len(mine) == want, name
        for x in mine:
            assert x["ms_per_sample"] > 0 and x["samples_per_s"] > 0 and x["batch"] == 4 and x["params"] > 0
            assert x["flops_per_sample"] > 0 and 0 < x["peak_fraction"] < 1.5
        if name in bench.ITERATIVE:
            f = {x["steps"]: x["flops_per_sample"] for x in mine}          # the row's "steps" is the NFE
            assert sorted(f) == ([2, 4] if name == "flow_matching" else [1, 2])   # FM's default: midpoint, 2 per step
            assert f[max(f)] > f[min(f)]                                   # two steps cost more than one
    fm_rows = [x for x in rows if x["model"] == "flow_matching"]
    assert all(x["weights"].endswith("flow_matching/ckpt.pt") for x in fm_rows)   # the checkpoint was used
    assert fm_rows[0]["params"] == sum(p.numel() for p in fm.build_model({**fm.DEFAULTS, "width": 2}).parameters())
    assert all(x["weights"] == "fresh weights" for x in rows if x["model"] == "vae")
    toy = [x for x in r["rows"] if x["model"].startswith("toy MC")]
    assert len(toy) == 1 and toy[0]["ms_per_sample"] > 0
    for x in rows:                     # every non-eager CPU row drew the same noise as fp32 eager: same output in
        assert x["check_W_noise"] >= 0  # fp32, bf16 rounding only in bf16
        if x["mode"] == "inference":
            assert x["check_W"] == 0 and x["check_rel_sum"] == 0, x
        if x["mode"] == "bf16":
            assert 0 <= x["check_W"] < float("inf") and 0 <= x["check_rel_sum"] < float("inf"), x


def test_paper_ignores_checkpoints_and_a_broken_one_does_not_stop_the_table(tmp_path, smoke_run):
    smoke_run("flow_matching.py", to=tmp_path / "runs" / "flow_matching")
    (tmp_path / "runs" / "vae").mkdir(parents=True)
    (tmp_path / "runs" / "vae" / "ckpt.pt").write_bytes(b"not a checkpoint")    # e.g. a stage-1-only or a broken one
    out = tmp_path / "b.json"
    res = cli("bench.py", "--models", "vae,flow_matching,gan", "--batch", 2, "--steps", 1, "--device", "cpu",
              "--runs", tmp_path / "runs", "--json", out, "--no-toy")
    r = json.loads(out.read_text())
    assert [x["model"] for x in r["rows"]] == ["vae"] + ["flow_matching"] * 3 + ["gan"] * 3
    assert r["rows"][0]["note"].startswith("skipped") and "vae" in res.stdout and "skipped" in res.stdout
    assert "trained weights from" in res.stdout and "random initialisation" in res.stdout
    cli("bench.py", "--models", "flow_matching", "--batch", 2, "--steps", 1, "--device", "cpu", "--paper",
        "--runs", tmp_path / "runs", "--json", out, "--no-toy")
    rows = json.loads(out.read_text())["rows"]
    paper = fm.build_networks(vars(fm.get_args(["--train", "--paper"])))
    assert all(x["weights"] == "fresh weights" for x in rows)                   # not the CPU-sized checkpoint
    assert rows[0]["params"] == sum(p.numel() for m in paper.values() for p in m.parameters())


def test_timing_loops_fast_calls_between_one_pair_of_clock_readings():
    import time
    calls = []

    def fn(c):
        calls.append(1)
        time.sleep(0.004)
    t = bench.timed(fn, None, repeats=2, device=torch.device("cpu"), min_seconds=0.03)
    assert 0.004 <= t < 0.008
    k = (len(calls) - 4) // 2                              # 1 + 2 warm-ups + 1 to size K, then 2 x K
    assert k >= 4 and len(calls) == 4 + 2 * k


def test_flop_counter_counts_attention_on_the_cpu():
    q = torch.randn(2, 4, 36, 24)
    f = bench.flops_per_sample(lambda c: torch.nn.functional.scaled_dot_product_attention(c, c, c), q)
    assert f == 2 * (2 * 4 * 36 * 36 * 24) * 2 / 2          # QK^T and AV, 2 FLOPs per MAC, per batch element


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


def test_gpu_report_stops_at_once_without_a_gpu():
    import subprocess
    import pytest
    from conftest import ROOT
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the report would run")
    out = subprocess.run(["bash", "tools/gpu_report.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr


def test_onnx_compile_and_channels_last_rows_time_the_sampler_module(monkeypatch, tmp_path):
    """--onnx times the exported Sampler in ONNX Runtime, same noise as eager: the same counts up to float32
    rounding; --compile compiles the Sampler's networks (not the sampler around them: issue 37);
    --channels-last times an NHWC copy: the same counts, the other rows' weights untouched."""
    import pytest
    pytest.importorskip("onnxruntime")
    compiled = []
    monkeypatch.setattr(bench.torch, "compile", lambda m, **kw: compiled.append((m, kw)) or m)   # no compiling
    rows = bench.main(["--models", "vae,flow_matching", "--batch", "3", "--steps", "2", "--device", "cpu", "--onnx",
                       "--compile", "--channels-last", "--no-toy", "--runs", str(tmp_path), "--json",
                       str(tmp_path / "b.json")])
    assert [x["mode"] for x in rows if x["model"] == "vae"] == ["eager", "inference", "bf16", "channels_last",
                                                                 "compile", "onnx"]
    for x in (x for x in rows if x["mode"] == "channels_last"):
        assert x["ms_per_sample"] > 0 and x["check_rel_sum"] < 1e-5, x
    onnx = [x for x in rows if x["mode"] == "onnx"]
    assert [x["model"] for x in onnx] == ["vae", "flow_matching"]
    for x in onnx:
        assert x["ms_per_sample"] > 0 and x["onnx_export_s"] > 0 and x["check_rel_sum"] < 1e-5, x
    assert [type(m).__name__ for m, _ in compiled] == ["VAE", "UNet"]             # the networks, once per model
    assert all(kw == dict(fullgraph=True, dynamic=False, mode=None) for _, kw in compiled)   # CPU: default mode


def test_joint_model_is_timed_per_particle_beside_the_two_separate_models(tmp_path):
    """Issue 17: sdigan_joint's rows (both responses per particle, its checks taken over both detectors, ONNX
    with two outputs) and the poster's comparison against gan.py (ZN) + sdigan_proton.py (ZP)."""
    import pytest
    pytest.importorskip("onnxruntime")
    out = tmp_path / "b.json"
    rows = bench.main(["--models", "gan,sdigan_proton,sdigan_joint,corrvae", "--batch", "3", "--device", "cpu",
                       "--onnx", "--no-toy", "--runs", str(tmp_path), "--json", str(out)])
    joint = [x for x in rows if x["model"] == "sdigan_joint"]
    assert [x["mode"] for x in joint] == ["eager", "inference", "bf16", "onnx"]
    assert all(x["detector"] == "joint" and x["ms_per_sample"] > 0 for x in joint)
    onnx = {x["model"]: x for x in rows if x["mode"] == "onnx"}
    assert onnx["sdigan_joint"]["check_rel_sum"] < 1e-5 and onnx["corrvae"]["check_rel_sum"] < 1e-5
    both = json.loads(out.read_text())["joint_vs_separate"]
    assert sorted(c["mode"] for c in both) == ["bf16", "eager", "inference", "onnx"]
    for c in both:
        ms = {x["model"]: x["ms_per_sample"] for x in rows if x["mode"] == c["mode"]}
        assert c["ratio"] == pytest.approx(ms["sdigan_joint"] / (ms["gan"] + ms["sdigan_proton"]))
    assert bench.joint_vs_separate(rows, "proton") == []       # gan.py's rows would be ZP: no comparison


def test_table_is_regenerated_from_the_committed_gpu_json(tmp_path):
    """The GPU numbers in docs/ are a command over results/gpu_*/bench_*.json: one Markdown row per JSON row."""
    src = Path(bench.__file__).parent / "results" / "gpu_NVIDIA_H200" / "bench_default.json"
    rows = json.loads(src.read_text())["rows"]
    md = cli("bench.py", "--table", src).stdout
    body = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(body) == len(rows) and "NVIDIA H200" in md
    fm_graph = next(r for r in rows if (r["model"], r["mode"], r["batch"]) == ("flow_matching", "graph", 4096))
    assert f"| flow_matching | graph | 11 | 4096 | {fm_graph['ms_per_sample']:.4f} |" in md
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    err = cli("bench.py", "--table", bad, ok=False).stderr
    assert "is not a bench.py JSON" in err and "Traceback" not in err


def test_a_paper_checkpoint_is_timed_with_the_papers_sampler(tmp_path, smoke_run):
    smoke_run("flow_matching.py", "--paper", to=tmp_path / "runs" / "flow_matching")
    rows = bench.main(["--models", "flow_matching", "--batch", "2", "--device", "cpu", "--no-toy", "--runs",
                       str(tmp_path / "runs"), "--json", str(tmp_path / "b.json"), "--only", "eager"])
    assert rows and all(x["weights"].endswith("flow_matching/ckpt.pt") for x in rows)
    assert {x["steps"] for x in rows} == {11}                 # Euler 11 (its --eval's sampler), not midpoint 4's 8


def test_cpu_bf16_row_times_a_contiguous_copy_and_agrees_with_fp32():
    """oneDNN's bf16 convolutions are slow on NHWC weights: the bf16 row times a contiguous copy of a channels-last
    Sampler (flow_matching loads NHWC weights), leaving the other rows' weights alone; same noise, close counts."""
    torch.manual_seed(0)
    net = fm.build_model(vars(fm.get_args(["--train"]))).to(memory_format=torch.channels_last).eval()
    sampler = fm.Sampler(net, (44, 44), 2, "euler", "none").eval()
    cond, built = torch.randn(3, 9), {}
    fn, why = bench._mode_fn("bf16", sampler, "flow_matching", cond, built)
    assert why is None and all(p.is_contiguous() for p in built["bf16"].parameters())
    assert any(not p.is_contiguous() for p in sampler.parameters())    # the eager rows' weights: still NHWC
    torch.manual_seed(1)
    low = fn(cond)
    torch.manual_seed(1)
    ref = sampler.run(cond)
    assert low.dtype == torch.float32 and (low.sum() - ref.sum()).abs() / ref.sum() < 0.02


def test_mode_selection_on_each_device():
    """Issue 37: the optional rows are added on a GPU too (the old expression parsed as `A if cuda else (B + C + D)`
    and dropped them there)."""
    a = bench.get_args(["--compile", "--onnx", "--channels-last", "--bf16-weights"])
    assert bench.select_modes(True, a) == ["eager", "amp", "graph", "graph-opt", "bf16-weights", "channels_last",
                                           "compile", "onnx"]
    assert bench.select_modes(False, a) == ["eager", "inference", "bf16", "bf16-weights", "channels_last", "compile",
                                            "onnx"]
    assert bench.select_modes(True, bench.get_args([])) == ["eager", "amp", "graph", "graph-opt"]
    assert bench.select_modes(False, bench.get_args([])) == ["eager", "inference", "bf16"]
    assert bench.select_modes(True, bench.get_args(["--compile", "--only", "compile"])) == ["compile"]


def test_modes_give_the_same_counts_on_the_same_noise():
    """Every CPU mode runs the same sampler on the same noise: fp32 modes (inference, channels-last, compiled
    networks) give eager's counts to float rounding; bf16 modes to bf16 rounding of the photon sums. The compiled
    row compiles the networks (children), not the sampler around them."""
    import gan
    torch.manual_seed(0)
    sampler = gan.Sampler(gan.build_model(vars(gan.get_args(["--train"])))).eval()
    cond, built = torch.randn(6, 9), {}

    def on_seed(fn):
        torch.manual_seed(3)
        return fn(cond)
    ref = on_seed(torch.no_grad()(sampler.run))
    for mode in ("inference", "channels_last", "compile", "bf16", "bf16-weights"):
        fn, why = bench._mode_fn(mode, sampler, "gan", cond, built)
        out = on_seed(fn)
        if mode in ("bf16", "bf16-weights"):
            assert (out.sum() - ref.sum()).abs() / ref.sum() < 0.02, mode
        else:
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3, msg=mode)
    assert isinstance(built["compiled"].gen, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(sampler.gen, torch._dynamo.eval_frame.OptimizedModule)       # the original is untouched
    w = [m.weight.dtype for m in built["bf16w"].modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert w and set(w) == {torch.bfloat16} and next(sampler.parameters()).dtype == torch.float32


def test_traffic_counts_inputs_and_outputs_of_every_op():
    moved, ops = bench.traffic(lambda c: (c * 2.0).exp(), torch.zeros(4, 10))
    assert ops == 2 and moved == 2 * (2 * 4 * 10 * 4) / 4        # two ops, each reads and writes 4 x 10 floats


def test_fresh_weights_take_the_memory_format_of_a_loaded_checkpoint(tmp_path, smoke_run):
    smoke_run("flow_matching.py", to=tmp_path / "runs" / "flow_matching")
    nhwc = lambda nets: all(p.is_contiguous(memory_format=torch.channels_last)
                            for n in nets for p in n.parameters() if p.dim() == 4)
    loaded, ck, _ = bench.load_nets("flow_matching", fm, "neutron", tmp_path / "runs", False, torch.device("cpu"))
    fresh, none, _ = bench.load_nets("flow_matching", fm, "neutron", tmp_path / "none", False, torch.device("cpu"))
    assert ck is not None and none is None and nhwc(loaded) and nhwc(fresh)
