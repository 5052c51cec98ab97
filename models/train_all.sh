#!/usr/bin/env bash
# Reproduce the bundled weights: generate two synthetic training sets, then train detect, label and
# segment on them. `make models` runs this. On a GPU machine (CUDA visible) the three trainers share the
# GPU; on CPU they run one after another (hours, not minutes). The bundled weights came from this recipe
# on one H200 (see the model cards: 222 + 61 cases were rendered in 140 s on 16 cores there).
# label is a fine-tune of the bundled label weights (LABEL_INIT), as the bundled label.pt was: its
# input preprocessing is kept, and the fresh synth ground truth has the corrected body centroids.
# Tunables via environment:
#   DATA=work/synth_train N=222 FINE=work/synth_fine NF=61 JOBS=<cores> MINUTES=6 SEG_MINUTES=9 OUTDIR=models
#   LABEL_INIT=models/label.pt LABEL_MINUTES=30
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-work/synth_train}    # all regions, grid capped at 40 M x 0.6^3 voxels: detect, label, segment
FINE=${FINE:-work/synth_fine}     # finer grids (0.8^3 cap) so the 1 mm segmentation patches see sharp bone
N=${N:-222}
NF=${NF:-61}
JOBS=${JOBS:-$(nproc)}
MINUTES=${MINUTES:-6}
SEG_MINUTES=${SEG_MINUTES:-9}
OUTDIR=${OUTDIR:-models}
VERSE=${VERSE:-verse}
LABEL_INIT=${LABEL_INIT:-models/label.pt}
LABEL_MINUTES=${LABEL_MINUTES:-30}

render() {  # folder, n, seed, scale
  if [ ! -f "$1/.complete" ]; then
    $VERSE synth "$1" --n "$2" --seed "$3" --scale "$4" --region random --no-qc --jobs "$JOBS" --quiet
    touch "$1/.complete"
  fi
}
render "$DATA" "$N" 10000 0.6
render "$FINE" "$NF" 30000 0.8
mkdir -p "$OUTDIR"
cp "$LABEL_INIT" "$OUTDIR/.label_init.pt"  # OUTDIR may hold the init itself: keep a copy to read
SEG_DATA=${DATA}_plus_fine
mkdir -p "$SEG_DATA"
ln -sf "$PWD/$DATA"/sub-* "$PWD/$FINE"/sub-* "$SEG_DATA"/

train() {  # name, data, minutes, extra args
  local name=$1 data=$2 minutes=$3; shift 3
  $VERSE train "$name" "$data" --out "$OUTDIR/$name.pt" --minutes "$minutes" --device auto --seed 0 "$@" \
    > "$OUTDIR/$name.train.log" 2>&1
}

if python3 -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  W=$(( JOBS / 4 > 1 ? JOBS / 4 : 1 ))
  train detect "$DATA" "$MINUTES" --workers "$W" --batch 4 &
  train label "$DATA" "$LABEL_MINUTES" --workers "$W" --init "$OUTDIR/.label_init.pt" --lr 5e-4 --real-views 2 &
  train segment "$SEG_DATA" "$SEG_MINUTES" --workers $(( 2 * W )) --batch 4 &
  wait
else
  train detect "$DATA" "$MINUTES" --workers 2
  train label "$DATA" "$LABEL_MINUTES" --workers 2 --init "$OUTDIR/.label_init.pt" --lr 5e-4 --real-views 2
  train segment "$SEG_DATA" "$SEG_MINUTES" --workers 2
fi
rm -f "$OUTDIR/.label_init.pt"
echo "weights written to $OUTDIR (logs: $OUTDIR/*.train.log)"
