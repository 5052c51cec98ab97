#!/usr/bin/env bash
# Interim demo (until every stage is wired): QC picture, evaluation and report of the
# real verse014 expert mask. `make demo` runs this with the venv on PATH.
set -euo pipefail
SHARED=${SHARED:-../shared}
OUT=${DEMO_OUT:-demo-out}
REAL=$SHARED/data/real/verse014
if [ ! -d "$REAL" ]; then
    echo "demo: $REAL not found; the interim demo needs the real fixtures" >&2
    exit 1
fi
D=$OUT/derivatives/sub-verse014
mkdir -p "$D"
verse snapshot "$REAL/sub-verse014_ct.nii.gz" "$REAL/sub-verse014_seg-vert_msk.nii.gz" \
    --ctd "$REAL/sub-verse014_seg-vb_ctd.json" -o "$D/sub-verse014_seg-vert_snp.png"
verse evaluate "$REAL/sub-verse014_seg-vert_msk.nii.gz" "$REAL/sub-verse014_seg-vert_msk.nii.gz" \
    --gt-ctd "$REAL/sub-verse014_seg-vb_ctd.json" -o "$D/sub-verse014_eval.json"
verse report "$OUT/derivatives" -o "$OUT/derivatives/report.html"
echo "pictures: $D/sub-verse014_seg-vert_snp.png"
echo "report:   $OUT/derivatives/report.html"
