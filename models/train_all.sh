#!/usr/bin/env bash
# Reproduce the bundled weights: generate two synthetic training sets, then train detect, label and
# segment on them. `make models` runs this. On a GPU machine (CUDA visible) the three trainers share the
# GPU; on CPU they run one after another (hours, not minutes). The bundled weights came from this recipe
# on one H200 (see the model cards: 222 + 61 cases were rendered in 140 s on 16 cores there).
# label is a fine-tune of the bundled label weights (LABEL_INIT), as the bundled label.pt was: its
# input preprocessing is kept, and the fresh synth ground truth has the corrected body centroids.
# segment is then fine-tuned three times, as the bundled segment.pt was: (1) SEG_FT_MINUTES at lr 1e-3 on a fresh
# synthetic set (seeds 50000 and 60000); (2) SEG_FT2_MINUTES at lr 5e-4 on another fresh set (seed 52000)
# plus SynthSeg-style renders (`verse synth --from-masks`) of the real verse004 expert mask, when
# $SHARED/data/real is present, so that real vertebral shapes are seen; (3) SEG_FT3_MINUTES at lr 5e-4 on
# two more synthetic sets and more verse004 renders, also only when verse004 is present.
# Tunables via environment:
#   DATA=work/synth_train N=222 FINE=work/synth_fine NF=61 JOBS=<cores> MINUTES=6 SEG_MINUTES=9 OUTDIR=models
#   LABEL_INIT=models/label.pt LABEL_MINUTES=30 SEG_FT=work/synth_segft NFT=156 NFTF=41 SEG_FT_MINUTES=6.3
#   NFT2=124 NMASK=9 SEG_FT2_MINUTES=2.3 NFT3=60 SEG_FT3_MINUTES=72 SHARED=../shared
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
SEG_FT=${SEG_FT:-work/synth_segft}
NFT=${NFT:-156}
NFTF=${NFTF:-41}
SEG_FT_MINUTES=${SEG_FT_MINUTES:-6.3}
SEG_FT2_MINUTES=${SEG_FT2_MINUTES:-2.3}
NFT2=${NFT2:-124}
NMASK=${NMASK:-9}
SHARED=${SHARED:-../shared}
NFT3=${NFT3:-60}
SEG_FT3_MINUTES=${SEG_FT3_MINUTES:-72}

has_cuda() { python3 -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

render() {  # folder, n, seed, scale
  if [ ! -f "$1/.complete" ]; then
    $VERSE synth "$1" --n "$2" --seed "$3" --scale "$4" --region random --no-qc --jobs "$JOBS" --quiet
    touch "$1/.complete"
  fi
}
render "$DATA" "$N" 10000 0.6
render "$FINE" "$NF" 30000 0.8
render "${SEG_FT}_a" "$NFT" 50000 0.6
render "${SEG_FT}_b" "$NFTF" 60000 0.8
mkdir -p "$OUTDIR"
cp "$LABEL_INIT" "$OUTDIR/.label_init.pt"  # OUTDIR may hold the init itself: keep a copy to read
SEG_DATA=${DATA}_plus_fine
mkdir -p "$SEG_DATA"
ln -sf "$PWD/$DATA"/sub-* "$PWD/$FINE"/sub-* "$SEG_DATA"/
mkdir -p "$SEG_FT"
ln -sf "$PWD/${SEG_FT}_a"/sub-* "$PWD/${SEG_FT}_b"/sub-* "$SEG_FT"/
render "${SEG_FT}2_a" "$NFT2" 52000 0.6
mkdir -p "${SEG_FT}2"
ln -sf "$PWD/${SEG_FT}2_a"/sub-* "${SEG_FT}2"/
VERSE004=$SHARED/data/real/verse004/sub-verse004_seg-vert_msk.nii.gz
if [ -f "$VERSE004" ] && [ ! -f "${SEG_FT}2_m/.complete" ]; then
  mkdir -p "${SEG_FT}2_masks"
  ln -sf "$(realpath "$VERSE004")" "${SEG_FT}2_masks/"
  $VERSE synth "${SEG_FT}2_m" --from-masks "${SEG_FT}2_masks" --n "$NMASK" --seed 70000 --no-qc --jobs "$JOBS" --quiet
  touch "${SEG_FT}2_m/.complete"
fi
if [ -d "${SEG_FT}2_m" ]; then ln -sf "$PWD/${SEG_FT}2_m"/sub-* "${SEG_FT}2"/; fi

train() {  # name, data, minutes, extra args
  local name=$1 data=$2 minutes=$3; shift 3
  $VERSE train "$name" "$data" --out "$OUTDIR/$name.pt" --minutes "$minutes" --device auto --seed 0 "$@" \
    > "$OUTDIR/$name.train.log" 2>&1
}

if has_cuda; then
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
cp "$OUTDIR/segment.pt" "$OUTDIR/.segment_init.pt"
SEG_FT_WORKERS=2
if has_cuda; then SEG_FT_WORKERS=$(( JOBS > 2 ? JOBS - 2 : 1 )); fi  # the GPU waits on slab sampling
$VERSE train segment "$SEG_FT" --out "$OUTDIR/segment.pt" --init "$OUTDIR/.segment_init.pt" --lr 1e-3 \
  --minutes "$SEG_FT_MINUTES" --device auto --seed 1 --workers "$SEG_FT_WORKERS" --batch 4 \
  > "$OUTDIR/segment_ft.train.log" 2>&1
cp "$OUTDIR/segment.pt" "$OUTDIR/.segment_init.pt"
$VERSE train segment "${SEG_FT}2" --out "$OUTDIR/segment.pt" --init "$OUTDIR/.segment_init.pt" --lr 5e-4 \
  --minutes "$SEG_FT2_MINUTES" --device auto --seed 2 --workers "$SEG_FT_WORKERS" --batch 4 \
  > "$OUTDIR/segment_ft2.train.log" 2>&1
# (3) a CPU-length fine-tune (72 min on 2 cores) on fresh synth (current generator, 0.6 and 0.8 scale) and
# 60 renders of verse004 with joint spaces at the facets (since 104aa9a)
if [ -f "$VERSE004" ]; then
  if [ ! -f "${SEG_FT}3_a/.complete" ]; then  # set B of bench/bench_variants.py: its variant schedule, seed 95000
    python -c 'import sys; from pathlib import Path; sys.path.insert(0, "bench"); import bench_variants as b
b.make_cases(int(sys.argv[1]), 0.6, Path(sys.argv[2]), int(sys.argv[3]), first_seed=95000)' "$NFT3" "${SEG_FT}3_a" "$JOBS"
    touch "${SEG_FT}3_a/.complete"
  fi
  render "${SEG_FT}3_b" "$NFT3" 42000 0.8
  if [ ! -f "${SEG_FT}3_m/.complete" ]; then
    $VERSE synth "${SEG_FT}3_m" --from-masks "${SEG_FT}2_masks" --n "$NFT3" --seed 71000 --no-qc --jobs "$JOBS" --quiet
    touch "${SEG_FT}3_m/.complete"
  fi
  mkdir -p "${SEG_FT}3"
  ln -sf "$PWD/${SEG_FT}3_a"/sub-* "$PWD/${SEG_FT}3_b"/sub-* "$PWD/${SEG_FT}3_m"/sub-* "${SEG_FT}3"/
  cp "$OUTDIR/segment.pt" "$OUTDIR/.segment_init.pt"
  $VERSE train segment "${SEG_FT}3" --out "$OUTDIR/segment.pt" --init "$OUTDIR/.segment_init.pt" --lr 5e-4 \
    --minutes "$SEG_FT3_MINUTES" --device auto --seed 5 --workers 1 --batch 2 \
    > "$OUTDIR/segment_ft3.train.log" 2>&1
fi
rm -f "$OUTDIR/.label_init.pt" "$OUTDIR/.segment_init.pt"
echo "weights written to $OUTDIR (logs: $OUTDIR/*.train.log)"
