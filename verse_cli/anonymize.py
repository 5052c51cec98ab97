"""``verse anonymize``: a DICOM series (or a NIfTI) in, an identity-free NIfTI out.

De-identification follows the DICOM PS3.15 Basic Application Level Confidentiality
Profile by construction rather than by deletion: nothing from the DICOM header is
copied into the outputs except an explicit allow-list of acquisition fields.

* The NIfTI gets a brand-new header from :mod:`verse_cli.core.io` (no descrip,
  aux_file, intent_name, db_name, no extensions): names, IDs, UIDs, dates, free text,
  private tags and sequences have no path into it.
* The sidecar JSON holds only ``Manufacturer``, ``ManufacturerModelName``,
  ``ConvolutionKernel``, ``KVP``, ``XRayTubeCurrent``, ``SliceThickness``, the voxel
  spacing, a contrast flag, the de-identification method (DICOM codes 113100...) and
  the tool version. Text values are reduced to a safe character set.
* Dates are dropped; with ``date_shift_days`` the acquisition date is kept shifted
  (option 113107). Patient age and sex are kept only with ``keep_demographics``
  (option 113108); ages of 90 and above are reported as ``"90+"`` (HIPAA safe harbour).

Pseudonyms
----------
``subject`` names the pseudonym. Without it, the pseudonym is derived from a hash of
the converted *voxel data* (``anon`` + 10 hex digits): reruns give the same name,
and since it is computed from no identifier, it cannot be reversed to a PatientID
(a hash of a PatientID could be, by trying every plausible ID). The price is that two
scans of one patient get different pseudonyms: use ``--subject`` (and ``--keymap``)
to keep scans of a patient together.

The key map CSV (``original_patient_id,subject,date_shift_days``) is written only
where the user asks, and never into the output's folder, which is the folder that
gets shared.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .core.errors import DataError, UsageError
from .core.io import fresh_image, is_nifti_path, load_nifti, save_nifti, write_json, write_text_atomic
from .core.progress import info, warn

# DICOM PS3.16 CID 7050 "De-identification Method": code value -> meaning.
CODES = {
    "113100": "Basic Application Confidentiality Profile",
    "113101": "Clean Pixel Data Option",
    "113102": "Clean Recognizable Visual Features Option",
    "113103": "Clean Graphics Option",
    "113104": "Clean Structured Content Option",
    "113105": "Clean Descriptors Option",
    "113106": "Retain Longitudinal Temporal Information Full Dates Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
    "113109": "Retain Device Identity Option",
    "113110": "Retain UIDs Option",
    "113111": "Retain Safe Private Option",
    "113112": "Retain Institution Identity Option",
}

_SUBJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_SAFE_TEXT_RE = re.compile(r"[^A-Za-z0-9 ._+\-/()\\]")
KEYMAP_FIELDS = ("original_patient_id", "subject", "date_shift_days")


# --------------------------------------------------------------------------- sidecar pieces
def method_codes(date_shift: bool, demographics: bool, defaced: bool = False) -> list[dict[str, str]]:
    """The DeidentificationMethodCodeSequence as a list of code dicts (PS3.16 CID 7050)."""
    values = ["113100"]
    if defaced:
        values.append("113102")
    if date_shift:
        values.append("113107")
    if demographics:
        values.append("113108")
    return [{"CodeValue": v, "CodingSchemeDesignator": "DCM", "CodeMeaning": CODES[v]} for v in values]


def method_text(codes: list[dict[str, str]]) -> str:
    """DeidentificationMethod: the codes in words."""
    words = "; ".join(f"{c['CodeMeaning']} ({c['CodeValue']})" for c in codes)
    return f"verse-cli {__version__}: DICOM PS3.15 {words}"


def record_method(sidecar: dict[str, Any], *, date_shift: bool | None = None, demographics: bool | None = None,
                  defaced: bool | None = None) -> dict[str, Any]:
    """Update a sidecar's de-identification fields, keeping options already recorded."""
    present = {c.get("CodeValue") for c in sidecar.get("DeidentificationMethodCodeSequence", [])}
    codes = method_codes(
        date_shift="113107" in present if date_shift is None else date_shift,
        demographics="113108" in present if demographics is None else demographics,
        defaced="113102" in present if defaced is None else defaced,
    )
    sidecar["PatientIdentityRemoved"] = "YES"
    sidecar["DeidentificationMethod"] = method_text(codes)
    sidecar["DeidentificationMethodCodeSequence"] = codes
    return sidecar


def _safe_text(value: Any) -> str | None:
    if value in (None, ""):
        return None
    values = [value] if isinstance(value, str) else list(value)
    text = "\\".join(str(v).strip() for v in values if str(v).strip())
    text = _SAFE_TEXT_RE.sub("", text)[:64].strip()
    return text or None


def _number(value: Any) -> float | int | None:
    if value in (None, ""):
        return None
    try:
        number = float(value if isinstance(value, (str, int, float)) else next(iter(value)))
    except (TypeError, ValueError, StopIteration):
        return None
    if not np.isfinite(number):
        return None
    return int(number) if number == int(number) else round(number, 4)


def _parse_date(value: Any) -> dt.date | None:
    text = str(value or "").strip()[:8]
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date() if len(text) == 8 else None
    except ValueError:
        return None


def _age_years(ds) -> int | None:
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    match = re.fullmatch(r"(\d{1,3})([DWMY])", text)
    if match:
        n, unit = int(match.group(1)), match.group(2)
        return {"Y": n, "M": n // 12, "W": n // 52, "D": n // 365}[unit]
    birth, scan = _parse_date(ds.get("PatientBirthDate")), _acquisition_date(ds)
    if birth and scan and scan >= birth:
        return scan.year - birth.year - ((scan.month, scan.day) < (birth.month, birth.day))
    return None


def _acquisition_date(ds) -> dt.date | None:
    for key in ("AcquisitionDate", "SeriesDate", "StudyDate", "ContentDate"):
        date = _parse_date(ds.get(key))
        if date:
            return date
    return None


def _contrast(ds) -> bool | None:
    if "ContrastBolusAgent" not in ds:
        return None
    return bool(str(ds.get("ContrastBolusAgent", "") or "").strip())


def acquisition_fields(ds) -> dict[str, Any]:
    """The allow-listed, non-identifying acquisition metadata of a DICOM header."""
    fields = {
        "Modality": _safe_text(ds.get("Modality")),
        "Manufacturer": _safe_text(ds.get("Manufacturer")),
        "ManufacturerModelName": _safe_text(ds.get("ManufacturerModelName")),
        "ConvolutionKernel": _safe_text(ds.get("ConvolutionKernel")),
        "KVP": _number(ds.get("KVP")),
        "XRayTubeCurrent": _number(ds.get("XRayTubeCurrent")),
        "SliceThickness": _number(ds.get("SliceThickness")),
        "ContrastBolusAgentPresent": _contrast(ds),
    }
    return {k: v for k, v in fields.items() if v is not None}


def demographic_fields(ds) -> dict[str, Any]:
    """PatientAge (years, "90+" above 89) and PatientSex, for --keep-demographics."""
    out: dict[str, Any] = {}
    age = _age_years(ds)
    if age is not None:
        out["PatientAge"] = "90+" if age >= 90 else age
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    if sex in ("M", "F", "O"):
        out["PatientSex"] = sex
    return out


def shifted_date(ds, days: int) -> str | None:
    """The acquisition date moved by ``days`` (ISO format), or None when the header has none."""
    date = _acquisition_date(ds)
    return (date + dt.timedelta(days=days)).isoformat() if date else None


# --------------------------------------------------------------------------- identifiers
def identifiers(ds) -> list[str]:
    """Identifying strings of a header that must not appear in any output name."""
    values = []
    for key in ("PatientID", "PatientName", "OtherPatientIDs", "AccessionNumber"):
        value = ds.get(key, None)
        if value in (None, ""):
            continue
        values.append(str(value))
        if key == "PatientName":
            values.extend(p for p in re.split(r"[\^= ]+", str(value)) if p)
    return [v.strip() for v in values if len(v.strip()) >= 3]


def check_names(paths: list[Path | None], ids: list[str]) -> None:
    """Refuse output file names that contain a patient identifier."""
    for path in paths:
        if path is None:
            continue
        name = path.name.upper()
        for value in ids:
            if value.upper() in name:
                raise UsageError(f"output name {path.name!r} contains a patient identifier; "
                                 "choose a pseudonymous file name")


def generated_pseudonym(data: np.ndarray, affine: np.ndarray) -> str:
    """``anon`` + 10 hex digits of a hash of the voxel data (deterministic, not identifier-based)."""
    digest = hashlib.sha256(b"verse-anonymize-v1")
    digest.update(np.ascontiguousarray(data).tobytes())
    digest.update(np.asarray(affine, dtype=np.float64).round(4).tobytes())
    return "anon" + digest.hexdigest()[:10]


# --------------------------------------------------------------------------- key map
def update_keymap(path: Path, original_id: str, subject: str, shift: int | None) -> None:
    """Insert or replace the row of ``subject`` in the key map CSV (written atomically)."""
    rows: list[dict[str, str]] = []
    if path.exists():
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames is None or set(KEYMAP_FIELDS) - set(reader.fieldnames):
                    raise DataError(f"not a verse key map (expected columns {', '.join(KEYMAP_FIELDS)})", path)
                rows = [r for r in reader if r["subject"] != subject]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"cannot read the key map ({exc})", path) from None
    rows.append({"original_patient_id": original_id, "subject": subject,
                 "date_shift_days": "" if shift is None else str(shift)})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=KEYMAP_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["subject"]))
    write_text_atomic(path, buffer.getvalue())
    os.chmod(path, 0o600)  # the key re-identifies subjects: owner only


# --------------------------------------------------------------------------- argument checks
def _check_arguments(input: Path, output: Path, sidecar: Path | None, subject: str | None,
                     keymap: Path | None) -> None:
    if not is_nifti_path(output):
        raise UsageError(f"output must end in .nii or .nii.gz: {output}")
    if subject is not None and not _SUBJECT_RE.match(subject):
        raise UsageError(f"--subject {subject!r}: use letters, digits, '-' and '_' only (at most 64)")
    if sidecar is not None and str(sidecar) != "-" and not str(sidecar).lower().endswith(".json"):
        raise UsageError(f"--sidecar must end in .json: {sidecar}")
    if keymap is not None:
        key_dir = keymap.expanduser().resolve().parent
        if key_dir == output.expanduser().resolve().parent:
            raise UsageError(f"--keymap {keymap} lies beside the output; keep the key map out of the "
                             "folder you share")
        if keymap.expanduser().resolve() in (output.resolve(), input.resolve()):
            raise UsageError("--keymap must be a separate file")


# --------------------------------------------------------------------------- NIfTI input
def scrub_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxel data and affine of a NIfTI, with scaling applied and everything else dropped."""
    img = load_nifti(path)
    raw = np.asanyarray(img.dataobj)
    slope, inter = img.header.get_slope_inter()
    if slope in (None, 1.0) and inter in (None, 0.0):
        return np.asarray(raw), img.affine
    data = np.asarray(img.get_fdata(dtype=np.float64))
    if np.all(data == np.round(data)) and data.min() >= -32768 and data.max() <= 32767:
        return data.astype(np.int16), img.affine
    return data.astype(np.float32), img.affine


# --------------------------------------------------------------------------- entry point
def anonymize(input: str | os.PathLike, output: str | os.PathLike, *, sidecar: str | os.PathLike | None = None,
              subject: str | None = None, keymap: str | os.PathLike | None = None,
              date_shift_days: int | None = None, series: str | None = None,
              keep_demographics: bool = False, resample_uneven: bool = False,
              correct_tilt: bool = False) -> dict[str, Any]:
    """Convert a DICOM series (or rewrite a NIfTI) into an identity-free NIfTI and sidecar.

    Parameters
    ----------
    input : path
        DICOM folder (searched recursively), one DICOM file, or a NIfTI file.
    output : path
        Output ``.nii.gz`` (int16 HU for DICOM input).
    sidecar : path, optional
        Sidecar JSON of allow-listed acquisition metadata (``-`` for stdout).
    subject : str, optional
        Pseudonym; generated from the voxel data when absent.
    keymap : path, optional
        CSV mapping the original PatientID to the pseudonym (never beside the output).
    date_shift_days : int, optional
        Keep the acquisition date, shifted by this many days, instead of removing it.
    series : str, optional
        SeriesInstanceUID or SeriesNumber when the input holds several CT series.
    keep_demographics : bool
        Keep PatientAge and PatientSex in the sidecar.
    resample_uneven, correct_tilt : bool
        See :func:`verse_cli.dicom.load_series`.

    Returns
    -------
    dict
        The sidecar content (also written when ``sidecar`` is given).
    """
    input, output = Path(input), Path(output)
    sidecar_path = None if sidecar is None else Path(sidecar)
    keymap_path = None if keymap is None else Path(keymap)
    _check_arguments(input, output, sidecar_path, subject, keymap_path)

    meta: dict[str, Any] = {}
    if is_nifti_path(input) and input.is_file():
        if keymap_path is not None:
            raise UsageError("--keymap needs DICOM input: a NIfTI carries no PatientID")
        if date_shift_days is not None or keep_demographics or series is not None:
            warn("--date-shift-days, --keep-demographics and --series apply to DICOM input only")
        data, affine = scrub_nifti(input)
        original_id = ""
        meta["SourceFormat"] = "NIfTI"
    else:
        from .dicom import load_series

        volume = load_series(input, series=series, resample_uneven=resample_uneven, correct_tilt=correct_tilt)
        data, affine, ds = volume.hu, volume.affine, volume.header
        check_names([output, sidecar_path], identifiers(ds))
        original_id = str(ds.get("PatientID", "") or "")
        meta["SourceFormat"] = "DICOM"
        meta.update(acquisition_fields(ds))
        meta["SlicesRead"] = volume.n_files
        if volume.resampled_slices:
            meta["SliceSpacingResampled"] = True
        if volume.tilt_corrected_deg:
            meta["GantryTiltCorrectedDeg"] = round(volume.tilt_corrected_deg, 3)
        if date_shift_days is not None:
            date = shifted_date(ds, date_shift_days)
            if date:
                meta["AcquisitionDateShifted"] = date
        if keep_demographics:
            meta.update(demographic_fields(ds))
        if keymap_path is not None and not original_id:
            warn("the DICOM header has no PatientID; the key map row has an empty original id")

    from .core.geometry import axcodes, spacing

    pseudonym = subject or generated_pseudonym(data, affine)
    content: dict[str, Any] = {"Subject": pseudonym, **meta,
                               "VoxelSpacingMm": [round(float(v), 6) for v in spacing(affine)],
                               "Shape": [int(v) for v in data.shape],
                               "Orientation": "".join(axcodes(affine))}
    record_method(content, date_shift=date_shift_days is not None and meta.get("SourceFormat") == "DICOM",
                  demographics=keep_demographics and meta.get("SourceFormat") == "DICOM", defaced=False)
    content["GeneratedBy"] = [{"Name": "verse-cli", "Version": __version__, "Command": "anonymize"}]

    save_nifti(fresh_image(data, affine), output)
    if sidecar_path is not None:
        write_json(content, sidecar_path)
    if keymap_path is not None:
        update_keymap(keymap_path, original_id, pseudonym, date_shift_days)
    info(f"wrote {output} ({'x'.join(map(str, data.shape))}, subject {pseudonym})")
    return content
