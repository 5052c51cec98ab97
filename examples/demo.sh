#!/usr/bin/env bash
# Interim demo (until every stage is wired): QC picture, evaluation and report of the
# real verse014 expert mask, and `verse evaluate` of the verse004 mask against itself and a
# perturbed copy. `make demo` runs this with the venv on PATH.
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
# verse004: the expert mask against itself, then against a perturbed copy (shifted 2 mm,
# L2 eroded, L5 called L6): evaluate must report Dice 1 / id.rate 1, then the damage.
V4=$SHARED/data/real/verse004
E4=$OUT/evaluate-verse004
mkdir -p "$E4/pred"
verse evaluate "$V4/sub-verse004_seg-vert_msk.nii.gz" "$V4/sub-verse004_seg-vert_msk.nii.gz" \
    --gt-ctd "$V4/sub-verse004_seg-subreg_ctd.json" -o "$E4/self.json" -q
python - "$V4/sub-verse004_seg-vert_msk.nii.gz" "$E4/pred/sub-verse004_seg-vert_msk.nii.gz" <<'PY'
import sys
import numpy as np
from scipy import ndimage
from verse_cli.core.io import load_mask, save_mask
img = load_mask(sys.argv[1])
m = np.roll(np.asarray(img.dataobj), 2, axis=0)      # 2 voxels (2 mm) along the first axis
m[(m == 21) & ~ndimage.binary_erosion(m == 21, iterations=2)] = 0   # L2 eroded
m[m == 24] = 25                                       # L5 mislabelled as L6
save_mask(m, img.affine, sys.argv[2])
PY
verse evaluate "$E4/pred/sub-verse004_seg-vert_msk.nii.gz" "$V4/sub-verse004_seg-vert_msk.nii.gz" \
    --gt-ctd "$V4/sub-verse004_seg-subreg_ctd.json" -o "$E4/perturbed.json" --csv "$E4/perturbed.csv"
verse report "$OUT/derivatives" -o "$OUT/derivatives/report.html"
echo "pictures: $D/sub-verse014_seg-vert_snp.png"
echo "report:   $OUT/derivatives/report.html"
echo "evaluate: $E4/self.json, $E4/perturbed.json, $E4/perturbed.csv"
