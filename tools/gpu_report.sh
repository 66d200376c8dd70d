#!/usr/bin/env bash
# The prepared GPU measurements, for the rare, short loans of a GPU machine (each part < 10 min, every step with
# its own time limit, the JSON written after every row, so a loan that ends mid-way returns the finished parts):
#   bash tools/gpu_report.sh probe     # issue 37 (~8.5 min): flow_matching --paper (Euler 11) and latent_fm --paper
#                                      # at batch 256 and 4096: eager / amp / graph / graph-opt (bf16 weights, NHWC)
#                                      # / bf16-weights, then compile (compiled networks + bf16 weights in the
#                                      # whole-sampler CUDA graph), each with bytes per sample, GB/s and spread;
#                                      # the top-15 kernels of one bf16 call and the copy bandwidth
#   bash tools/gpu_report.sh suite     # issue 22 (~7.5 min): every model, default and --paper sizes (below)
# Writes under results/gpu_<device>/ (and a copy under $OUT when the caller sets it). Without a GPU it stops.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-probe}"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_report: no CUDA GPU visible to torch ($(python -c 'import torch; print(torch.__version__)')): nothing to measure" >&2
    exit 2
fi
dev=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_').replace('/', '_'))")
out="results/gpu_$dev"
mkdir -p "$out"
echo "gpu_report $part: $dev -> $out"
export PYTHONUNBUFFERED=1
save() { if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp -r "$out" "$OUT/"; fi; }
if [ "$part" = probe ]; then
    common="--device cuda --paper --no-toy --repeats 3 --batch 256,4096"
    timeout 200 python bench.py $common --models flow_matching,latent_fm --bf16-weights \
        --json "$out/bench_probe.json" || echo "gpu_report: bench probe stopped (rc $?)"
    save
    OUT="$out" timeout 60 python tools/gpu_profile.py || echo "gpu_report: profile stopped (rc $?)"
    save
    timeout 150 python bench.py $common --models flow_matching --compile --only compile \
        --json "$out/bench_probe_compile_fm.json" || echo "gpu_report: compile fm stopped (rc $?)"
    save
    timeout 110 python bench.py $common --models latent_fm --compile --only compile \
        --json "$out/bench_probe_compile_lfm.json" || echo "gpu_report: compile latent_fm stopped (rc $?)"
    save
    echo "gpu_report: probe done; python bench.py --table $out/bench_probe*.json; commit $out"
    exit 0
fi
# suite (issue 22):
#   bench_default.json  bench.py --full: every model at the CPU-default sizes, batch 256 and 4096, eager fp32
#                       (TF32 off) / bf16 AMP / CUDA graph / graph-opt, each non-eager row checked against fp32 eager
#   bench_paper.json    the same at the published (--paper) sizes, fresh weights, every model but ddpm
#   bench_paper_ddpm.json  ddpm at --paper size, batch 256 only (its batch-4096 rows cost ~70 s each on an H200)
#   train_fm_paper.json flow_matching.py --paper training throughput (steps/s), fp32 and --amp, 60 s each
timeout 60 python data.py > "$out/data.log" 2>&1 || echo "gpu_report: toy data generation failed (see $out/data.log)"
timeout 180 python bench.py --device cuda --full --json "$out/bench_default.json" || echo "gpu_report: bench default stopped (rc $?)"
save
all_but_ddpm=$(python -c "import bench; print(','.join(m for m in bench.MODELS if m != 'ddpm'))")
timeout 180 python bench.py --device cuda --full --paper --no-toy --json "$out/bench_paper.json" --models "$all_but_ddpm" \
    || echo "gpu_report: bench --paper stopped (rc $?)"
save
timeout 60 python bench.py --device cuda --full --paper --no-toy --models ddpm --batch 256 \
    --json "$out/bench_paper_ddpm.json" || echo "gpu_report: bench --paper ddpm stopped (rc $?)"
save
for mode in fp32 amp; do
    run="/tmp/gpu_report_fm_$mode"
    rm -rf "$run"
    flag=$([ "$mode" = amp ] && echo --amp || true)
    timeout 60 python flow_matching.py --train --paper $flag --device cuda --val-every 200 --out "$run" > "$run.log" 2>&1
    echo "gpu_report: flow_matching --paper $mode training stopped after its 60 s (rc $?)"
    tail -c 3000 "$run.log" | tr '\r' '\n' | tail -5
done
python - "$out" <<'PY'
import json, sys, torch
from pathlib import Path
out, res = Path(sys.argv[1]), {}
for mode in ("fp32", "amp"):
    rows = [json.loads(l) for l in Path(f"/tmp/gpu_report_fm_{mode}/metrics.jsonl").read_text().splitlines()] \
        if Path(f"/tmp/gpu_report_fm_{mode}/metrics.jsonl").exists() else []
    if len(rows) >= 2:   # steps/s between the first and the last logged row (validation time included)
        a, b = rows[0], rows[-1]
        res[mode] = dict(steps_per_s=(b["step"] - a["step"]) / (60 * (b["minutes"] - a["minutes"])), rows=rows)
    else:
        res[mode] = dict(steps_per_s=None, note="fewer than 2 logged rows in its 60 s")
res.update(device=torch.cuda.get_device_name(0), torch=torch.__version__,
           command="flow_matching.py --train --paper [--amp] --device cuda --val-every 200, 60 s each")
(out / "train_fm_paper.json").write_text(json.dumps(res, indent=1))
print({k: v.get("steps_per_s") for k, v in res.items() if isinstance(v, dict)})
PY
save
echo "gpu_report: done; commit $out"
