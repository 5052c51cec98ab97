#!/usr/bin/env bash
# Reproduce the bundled weights: generate a synthetic training set, then train detect, label and
# segment on it. `make models` runs this. On a GPU machine (CUDA visible) the three trainers share the
# GPU; on CPU they run one after another. Tunables via environment:
#   DATA=work/synth_train N=600 SEED=10000 JOBS=<cores> MINUTES=5 OUTDIR=models
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-work/synth_train}
N=${N:-600}
SEED=${SEED:-10000}
JOBS=${JOBS:-$(nproc)}
MINUTES=${MINUTES:-5}
OUTDIR=${OUTDIR:-models}
VERSE=${VERSE:-verse}

if [ ! -f "$DATA/.complete" ]; then
  $VERSE synth "$DATA" --n "$N" --seed "$SEED" --region random --jobs "$JOBS" --quiet
  touch "$DATA/.complete"
fi

train() {  # name, extra args
  local name=$1; shift
  $VERSE train "$name" "$DATA" --out "$OUTDIR/$name.pt" --minutes "$MINUTES" --device auto --seed 0 "$@" \
    > "$OUTDIR/$name.train.log" 2>&1
}

if python3 -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  W=$(( JOBS / 3 > 1 ? JOBS / 3 : 1 ))
  train detect --workers "$W" & train label --workers "$W" & train segment --workers "$W" &
  wait
else
  train detect --workers 2; train label --workers 2; train segment --workers 2
fi
echo "weights written to $OUTDIR (logs: $OUTDIR/*.train.log)"
