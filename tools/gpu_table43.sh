#!/usr/bin/env bash
# A backbone column of the thesis' Table 4.3 (issue 15), trained on one GPU: on 2 CPU cores a 1M-parameter ViT step
# costs ~5x a CNN step (results/time_arch_cpu.json), so the five runs (~2 h together there) are a GPU job.
#   bash tools/gpu_table43.sh            # the five autoencoders of metrics.TABLE43 with --arch vit, in parallel
#   ARCH=vdvae bash tools/gpu_table43.sh # the same with the thesis' CNN pair
#   ONLY="sae_ng sae_ng_l2" bash tools/gpu_table43.sh        # some rows only (their TABLE43 stems)
# Each run is `python <TABLE43 command> --arch $ARCH --train --device cuda`: the CPU-default recipe (epochs, batch,
# learning rate) of the CNN column, only the backbone differs (measured on an H200, 2026-12-04: the ViT runs took
# 1.6-2.3 min each, side by side). Checkpoints go to runs/t43_<stem>_<arch>/ and, when the caller sets $OUT (the
# device tool), a copy to $OUT/<stem>_<arch>.pt without the optimiser state (weights for --eval; a run stopped by
# its limit keeps its full checkpoint, so it can be resumed). Evaluate anywhere with
#   python vae.py --eval --ckpt CKPT --max-test 2000     (sae_ng.py for the sae_ng rows)
# and copy the eval.json to results/<stem>_<arch>_neutron_random.json; `metrics.py --results results --table43`.
set -uo pipefail
cd "$(dirname "$0")/.."
arch=${ARCH:-vit}
case "$arch" in
    vit) width="" ;;                       # the ViT's CPU default is its published size (1M)
    vdvae) width="--set width=64" ;;       # the thesis' CNN at its published width (64 / 128 / 256 channels)
    *) echo "gpu_table43: ARCH=$arch: vit or vdvae" >&2; exit 2 ;;
esac
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_table43: no CUDA GPU visible to torch: nothing to train" >&2
    exit 2
fi
limit=${LIMIT_S:-330}                      # seconds per run (they run side by side)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
timeout 60 python data.py > /tmp/gpu_table43_data.log 2>&1 || echo "gpu_table43: toy data generation failed"
mkdir -p runs
dest=${OUT:-runs/table43_$arch}
mkdir -p "$dest"
runs=$(python -c "import metrics; print('\n'.join(f'{r[3]} {r[4]}' for r in metrics.TABLE43))")
while read -r stem cmd; do
    [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $stem "* ]] && continue
    run="runs/t43_${stem}_${arch}"
    rm -rf "$run"
    ( timeout "$limit" python $cmd --arch "$arch" $width --train --device cuda --ckpt-every 500 --out "$run" > "$run.log" 2>&1
      echo "gpu_table43: $stem rc $?" ) &
done <<< "$runs"
wait
python - "$dest" "$arch" <<'PY'
import os, sys, torch, metrics
from pathlib import Path
dest, arch = Path(sys.argv[1]), sys.argv[2]
for row in metrics.TABLE43:
    run = Path(f"runs/t43_{row[3]}_{arch}")
    if os.environ.get("ONLY") and row[3] not in os.environ["ONLY"].split():
        continue
    if not (run / "ckpt.pt").exists():
        print(f"{row[3]}: no checkpoint"); continue
    ck = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)
    done = "done:" in Path(f"{run}.log").read_text()
    if done:                                   # weights only: a third of the size, enough for --eval / --sample
        ck = {k: v for k, v in ck.items() if k not in ("opt", "opt_ng")}
    torch.save(ck, dest / f"{row[3]}_{arch}.pt")
    print(f"{row[3]}: step {ck['step']}, {'finished' if done else 'STOPPED by its limit (full checkpoint)'}")
PY
tar czf "$dest/logs.tgz" runs/t43_*_"$arch".log runs/t43_*_"$arch"/metrics.jsonl 2>/dev/null
for f in runs/t43_*_"$arch".log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -a "step\|done\|Error" | tail -3; done
