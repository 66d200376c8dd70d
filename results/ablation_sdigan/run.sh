#!/bin/bash
# The ablation's commands (issue 35 item 1): every variant x seed, train then eval, each run queued separately
# through the machine's lock; the eval.json + .sums.npz are copied to evals/<variant>_s<seed>.* here. The seed
# is train_seed (initialisation and noise): every run has the same toy data, split and test events.
#   bash results/ablation_sdigan/run.sh "SETTINGS" SEEDS [VARIANTS]     (from the repository root)
# env: RUNS (run folders), HERE (where the JSONs go), TAG (a suffix of the run names)
set -u
SETTINGS=$1; SEEDS=$2; VARIANTS=${3:-"gan sdi sdi-int sdi-int-aux"}
export ZDC_CACHE=${ZDC_CACHE:-/tmp/zdc_cache}
RUNS=${RUNS:-/work/runs/ablation_sdigan}; HERE=${HERE:-results/ablation_sdigan/evals}; TAG=${TAG:-}
mkdir -p "$RUNS" "$HERE"
for seed in $SEEDS; do
  for v in $VARIANTS; do
    name=${v}_s$seed$TAG; out=$RUNS/$name; plot=""; [ "$seed" = "$(echo $SEEDS | cut -d' ' -f1)" ] && plot="--plot"
    [ -f "$HERE/$name.json" ] && continue
    ${LOCK:-flock /tmp/zdc.lock} bash -c "python sdigan_proton.py --train --variant $v --set train_seed=$seed --out $out $SETTINGS \
      > $out.train.log 2>&1 && python sdigan_proton.py --eval --ckpt $out/ckpt.pt --max-test 2000 $plot \
      > $out.eval.log 2>&1" && cp "$out/eval.json" "$HERE/$name.json" \
      && cp "$out/eval.sums.npz" "$HERE/$name.sums.npz" \
      && sed -i "s/\"sums\": \"eval.sums.npz\"/\"sums\": \"$name.sums.npz\"/" "$HERE/$name.json" && echo "$(date -u +%T) done $name" \
      || echo "$(date -u +%T) FAILED $name (see $out.*.log)"
  done
done
