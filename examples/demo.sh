#!/usr/bin/env bash
# `make demo`: the whole chain, DICOM series to annotated VerSe-layout dataset.
#
#  1. `verse synth --dicom` makes a synthetic spine CT as a DICOM series, with a fictitious
#     patient identity in its headers, plus its ground truth (mask, centroids, variants);
#  2. the real VerSe CT verse014 joins as a NIfTI when $SHARED/data/real is present;
#  3. examples/Makefile builds the dataset: anonymize -> deface -> detect -> label ->
#     segment -> merge -> rate-variants -> snapshot (+ evaluate) -> report;
#  4. the evaluation table is printed, with where the pictures and the report are.
#
# Environment: SHARED (default ../shared), DEMO_OUT (default demo-out), DEMO_SEED (default 7),
# JOBS (default 2). `make demo` puts the venv's `verse` on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${DEMO_OUT:-demo-out}
SEED=${DEMO_SEED:-7}
JOBS=${JOBS:-2}
SUBJECT=$(printf 'syn%04d' "$SEED")
REAL=$SHARED/data/real/verse014
START=$(date +%s)

step() { printf '\n== %s (%ss)\n' "$1" "$(( $(date +%s) - START ))"; }

rm -rf "$OUT"
mkdir -p "$OUT/src" "$OUT/gt/sub-$SUBJECT"

step "1. synthetic subject as a DICOM series (fictitious identity)"
verse synth "$OUT/synth" --n 1 --seed "$SEED" --region lumbar --scale "${DEMO_SCALE:-0.6}" --dicom --no-qc --quiet
mv "$OUT/synth/sub-${SUBJECT}_dicom" "$OUT/src/$SUBJECT"
IDENTITY=$OUT/synth/sub-${SUBJECT}_dicom_identity.json
for f in seg-vert_msk.nii.gz seg-subreg_ctd.json variants.json; do
    mv "$OUT/synth/sub-${SUBJECT}_$f" "$OUT/gt/sub-$SUBJECT/"
done
echo "$(find "$OUT/src/$SUBJECT" -type f | wc -l) DICOM files in $OUT/src/$SUBJECT"

if [ -d "$REAL" ]; then
    step "2. real VerSe subject verse014 (NIfTI) from $REAL"
    mkdir -p "$OUT/gt/sub-verse014"
    ln -s "$(realpath "$REAL/sub-verse014_ct.nii.gz")" "$OUT/src/verse014.nii.gz"
    ln -s "$(realpath "$REAL/sub-verse014_seg-vert_msk.nii.gz")" "$OUT/gt/sub-verse014/"
    ln -s "$(realpath "$REAL/sub-verse014_seg-vb_ctd.json")" "$OUT/gt/sub-verse014/"
else
    step "2. $REAL not found: synthetic subject only"
fi

step "3. examples/Makefile (make -k -j$JOBS)"
# -k: a subject whose stage fails does not stop the others; the failure is reported at the end
STATUS=0
make --no-print-directory -k -f examples/Makefile SRC="$OUT/src" OUT="$OUT" GT="$OUT/gt" -j"$JOBS" \
    ${DEMO_MAKE_ARGS:-} || STATUS=$?
[ -f "$OUT/derivatives/report.html" ] || verse report "$OUT/derivatives" -o "$OUT/derivatives/report.html" --quiet

step "4. identity check: no identifying value of the DICOM headers may reach the dataset"
python - "$IDENTITY" "$OUT/rawdata" "$OUT/derivatives" <<'PY'
import gzip, json, sys
from pathlib import Path
def telling(v):  # long enough not to match by chance (weights like 63.5 do)
    return len(v) >= 5 or (len(v) >= 4 and any(c.isalpha() for c in v))
fields = [str(v) for v in json.loads(Path(sys.argv[1]).read_text()).values()]
values = {p for v in fields for p in [v, *v.split("^")] if telling(p)}
found = []
for root in sys.argv[2:]:
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            found += [f"{path}: {v}" for v in values if v.encode() in data]
print(f"{len(values)} identifying values searched in every output file: {len(found)} found")
if found:
    sys.exit("\n".join(found))
PY

step "5. evaluation against ground truth"
COLUMNS=${COLUMNS:-110} verse evaluate --pred-dir "$OUT/derivatives" --gt-dir "$OUT/gt" --resample-pred \
    -o "$OUT/derivatives/evaluation.json" --csv "$OUT/derivatives/evaluation.csv"

step "done"
if [ "$STATUS" -ne 0 ]; then
    echo "WARNING: some stages failed (see the messages above); the rest of the dataset was built." >&2
fi
echo "dataset:   $OUT/rawdata, $OUT/derivatives"
echo "pictures:  $(ls "$OUT"/derivatives/sub-*/sub-*_seg-vert_snp.png | tr '\n' ' ')"
echo "report:    $OUT/derivatives/report.html"
echo "metrics:   $OUT/derivatives/evaluation.json, $OUT/derivatives/evaluation.csv"
echo "Correct a file (e.g. $OUT/derivatives/sub-$SUBJECT/sub-${SUBJECT}_seg-subreg_ctd.json) and rerun:"
echo "  make -f examples/Makefile SRC=$OUT/src OUT=$OUT GT=$OUT/gt"
exit "$STATUS"
