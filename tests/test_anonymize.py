"""``verse anonymize``: geometry and HU on the real series, PHI never leaks, broken series fail cleanly."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

SERIES = "ct-dicom-siemens"

# Distinctive PHI planted into copies of the real series (none of it may reach any output).
PHI = {
    "PatientName": "Quuxington^Zebedee^Marmaduke",
    "PatientID": "PID98765ZQX",
    "PatientBirthDate": "19430517",
    "OtherPatientIDs": "OTHERID4471XQ",
    "AccessionNumber": "ACC5550199QZ",
    "StudyDate": "20190321",
    "SeriesDate": "20190321",
    "AcquisitionDate": "20190321",
    "ContentDate": "20190322",
    "StudyInstanceUID": "1.2.826.0.1.3680043.99.777333.1",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.99.777333.2",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.99.777333.3",
    "InstitutionName": "Quokka Valley Hospital",
    "InstitutionAddress": "17 Wombat Lane, Snarkville",
    "ReferringPhysicianName": "Xylophonist^Doctor",
    "OperatorsName": "Operatorius^Gert",
    "PerformingPhysicianName": "Performa^Ingrid",
    "StationName": "QVHSCANNER7",
    "DeviceSerialNumber": "SERIAL4477821",
    "SeriesDescription": "Zorblat spine protocol",
    "StudyDescription": "Flumph study",
    "ProtocolName": "Grimbleshanks protocol",
    "ImageComments": "patient Quuxington complained of Narwhal pain",
    "RequestingPhysician": "Requesto^Hortensia",
    "PatientAge": "047Y",
    "PatientSex": "F",
}
PRIVATE_SECRET = "PRIVATESECRET7781"
NESTED_SECRET = "NESTEDSECRET3141"
NESTED_UID = "1.2.826.0.1.3680043.99.777333.9"


# --------------------------------------------------------------------------- helpers
def sorted_series(real_data: Path) -> list[Path]:
    """Fixture files ordered by position along the (axial) normal."""
    files = sorted((real_data / SERIES).iterdir())
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def copy_series(real_data: Path, dst: Path, n: int | None = None) -> list[Path]:
    """Copy ``n`` contiguous slices (all by default) into ``dst``; returns the copies in z order."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for i, src in enumerate(sorted_series(real_data)[:n]):
        target = dst / f"IM{i:04d}.dcm"
        shutil.copyfile(src, target)
        out.append(target)
    return out


def edit(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def plant_phi(ds: Dataset, index: int) -> None:
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.99.777333.100{index}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    block = ds.private_block(0x0011, "ACME SECRETS", create=True)
    block.add_new(0x01, "LO", PRIVATE_SECRET)
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = NESTED_UID
    inner.PatientName = "Nestedname^Ophelia"
    deeper = Dataset()
    deeper.ScheduledProcedureStepDescription = NESTED_SECRET
    inner.RequestAttributesSequence = Sequence([deeper])
    ds.ReferencedStudySequence = Sequence([inner])


def needles() -> set[bytes]:
    """Every planted string, as written and upper-cased, plus dates in ISO form."""
    values = [v for k, v in PHI.items() if k not in ("PatientAge", "PatientSex")]
    values += [PRIVATE_SECRET, NESTED_SECRET, NESTED_UID, "Nestedname", "Ophelia"]
    values += [p for v in values for p in v.split("^")]
    values += ["1943-05-17", "2019-03-21", "1.2.826.0.1.3680043.99.777333"]
    return {s.encode() for v in values for s in (v, v.upper())}


def output_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, NIfTI decompressed, keyed by name."""
    out = {}
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            out[path.name] = gzip.decompress(data) if path.name.endswith(".gz") else data
    return out


def assert_failed_cleanly(proc, folder: Path, *words: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("verse: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr.lower(), proc.stderr
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


@pytest.fixture(scope="module")
def converted(real_data, tmp_path_factory):
    """The real series converted once through the CLI."""
    from conftest import run_verse

    out = tmp_path_factory.mktemp("conv")
    proc = run_verse("anonymize", real_data / SERIES, out / "ct.nii.gz", "--sidecar", out / "ct.json")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def phi_series(real_data, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("phi") / "dicom"
    for i, path in enumerate(copy_series(real_data, src, n=8)):
        edit(path, lambda ds, i=i: plant_phi(ds, i))
    return src


# --------------------------------------------------------------------------- geometry and HU
def test_affine_matches_reference_segmentation(converted, real_data):
    ours = nib.load(converted / "ct.nii.gz")
    ref = nib.load(real_data / f"{SERIES}_reference-seg.nii.gz")
    assert ours.shape == ref.shape
    assert np.abs(ours.affine - ref.affine).max() < 1e-3
    assert ours.get_data_dtype() == np.int16


def test_hu_equal_pixel_array_times_slope_plus_intercept(converted, real_data):
    data = np.asanyarray(nib.load(converted / "ct.nii.gz").dataobj)
    slices = [pydicom.dcmread(p) for p in sorted_series(real_data)]
    expected = np.stack([ds.pixel_array.astype(np.int64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                         for ds in slices])  # (z, rows, cols)
    expected = expected.transpose(2, 1, 0)[:, ::-1, :]  # columns, flipped rows, slices
    np.testing.assert_array_equal(data, expected)


def test_sidecar_has_acquisition_fields_only(converted):
    side = json.loads((converted / "ct.json").read_text())
    assert side["Manufacturer"] == "SIEMENS"
    assert side["KVP"] == 120 and side["SliceThickness"] == 3
    assert side["VoxelSpacingMm"] == [0.976562, 0.976562, 2.0]  # spacing from positions, not thickness
    assert side["ContrastBolusAgentPresent"] is True
    assert side["PatientIdentityRemoved"] == "YES"
    assert [c["CodeValue"] for c in side["DeidentificationMethodCodeSequence"]] == ["113100"]
    assert "Basic Application Confidentiality Profile" in side["DeidentificationMethod"]
    assert side["GeneratedBy"][0]["Version"]
    assert not {"PatientAge", "PatientSex", "AcquisitionDateShifted"} & set(side)
    assert side["Subject"].startswith("anon")


def test_order_comes_from_positions_not_names(real_data, tmp_path, verse):
    from verse_cli.dicom import load_series

    src = tmp_path / "shuffled"
    files = copy_series(real_data, src, n=6)
    expected = load_series(src)
    rng = np.random.default_rng(0)
    for new_index, path in zip(rng.permutation(len(files)), files):
        edit(path, lambda ds, k=int(new_index): setattr(ds, "InstanceNumber", k))
        path.rename(src / f"Z{new_index:03d}.dcm")
    proc = verse("anonymize", src, tmp_path / "out" / "ct.nii.gz", "-q")
    assert proc.returncode == 0, proc.stderr
    img = nib.load(tmp_path / "out" / "ct.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), expected.hu)
    np.testing.assert_allclose(img.affine, expected.affine)


# --------------------------------------------------------------------------- PHI
def test_no_planted_phi_in_any_output_byte(phi_series, tmp_path, verse):
    out = tmp_path / "release"
    keys = tmp_path / "private" / "keys.csv"
    proc = verse("anonymize", phi_series, out / "sub-x_ct.nii.gz", "--sidecar", out / "sub-x_ct.json",
                 "--keymap", keys)
    assert proc.returncode == 0, proc.stderr
    files = output_bytes(out)
    assert set(files) == {"sub-x_ct.nii.gz", "sub-x_ct.json"}
    for name, data in files.items():
        for needle in needles():
            assert needle not in data, f"{needle!r} found in {name}"
            assert needle not in name.encode()
    # The key map (kept apart, owner-only) is where the PatientID is allowed to be.
    rows = list(csv.DictReader(keys.open()))
    side = json.loads(files["sub-x_ct.json"])
    assert rows == [{"original_patient_id": PHI["PatientID"], "subject": side["Subject"], "date_shift_days": ""}]
    assert keys.stat().st_mode & 0o077 == 0


def test_date_shift_and_demographics_are_opt_in(phi_series, tmp_path, verse):
    out = tmp_path / "release"
    proc = verse("anonymize", phi_series, out / "ct.nii.gz", "--sidecar", out / "ct.json", "--subject", "sub01",
                 "--date-shift-days", "-100", "--keep-demographics")
    assert proc.returncode == 0, proc.stderr
    side = json.loads((out / "ct.json").read_text())
    assert side["Subject"] == "sub01"
    assert side["AcquisitionDateShifted"] == "2018-12-11"  # 2019-03-21 minus 100 days
    assert side["PatientAge"] == 47 and side["PatientSex"] == "F"
    codes = [c["CodeValue"] for c in side["DeidentificationMethodCodeSequence"]]
    assert codes == ["113100", "113107", "113108"]
    assert "Retain Patient Characteristics" in side["DeidentificationMethod"]
    text = (out / "ct.json").read_bytes()
    assert b"20190321" not in text and b"2019-03-21" not in text and b"1943" not in text


def test_generated_pseudonym_is_deterministic(phi_series, tmp_path, verse):
    names = []
    for run in ("a", "b"):
        proc = verse("anonymize", phi_series, tmp_path / run / "ct.nii.gz", "--sidecar", tmp_path / run / "s.json")
        assert proc.returncode == 0, proc.stderr
        names.append(json.loads((tmp_path / run / "s.json").read_text())["Subject"])
    assert names[0] == names[1]
    assert PHI["PatientID"].lower() not in names[0].lower()
    assert (tmp_path / "a" / "ct.nii.gz").read_bytes() == (tmp_path / "b" / "ct.nii.gz").read_bytes()


def test_keymap_beside_output_is_refused(phi_series, tmp_path, verse):
    out = tmp_path / "release"
    proc = verse("anonymize", phi_series, out / "ct.nii.gz", "--keymap", out / "keys.csv")
    assert proc.returncode == 2 and "keymap" in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_output_name_with_patient_id_is_refused(phi_series, tmp_path, verse):
    out = tmp_path / "release"
    proc = verse("anonymize", phi_series, out / f"{PHI['PatientID']}.nii.gz")
    assert proc.returncode == 2 and "identifier" in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_nifti_input_is_rewritten_with_a_scrubbed_header(tmp_path, verse):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr["descrip"] = b"Quuxington descrip"
    hdr["aux_file"] = b"AUXSECRET77"
    hdr["intent_name"] = b"INTSECRET"
    hdr["db_name"] = b"DBSECRET55"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"comment PID98765ZQX in extension"))
    src = tmp_path / "in.nii.gz"
    nib.save(img, src)
    out = tmp_path / "release" / "ct.nii.gz"
    proc = verse("anonymize", src, out, "--subject", "s1")
    assert proc.returncode == 0, proc.stderr
    raw = gzip.decompress(out.read_bytes())
    for needle in (b"Quuxington", b"AUXSECRET77", b"INTSECRET", b"DBSECRET55", b"PID98765ZQX"):
        assert needle not in raw
    back = nib.load(out)
    assert not back.header.extensions
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)
    np.testing.assert_allclose(back.affine, affine)


# --------------------------------------------------------------------------- broken series
def test_missing_slice(real_data, tmp_path, verse):
    files = copy_series(real_data, tmp_path / "in", n=6)
    files[3].unlink()
    proc = verse("anonymize", tmp_path / "in", tmp_path / "out" / "ct.nii.gz")
    assert_failed_cleanly(proc, tmp_path / "out", "missing slice")


def test_missing_slice_resampled_on_request(real_data, tmp_path, verse):
    files = copy_series(real_data, tmp_path / "in", n=6)
    files[3].unlink()
    proc = verse("anonymize", tmp_path / "in", tmp_path / "out" / "ct.nii.gz", "--resample-uneven")
    assert proc.returncode == 0, proc.stderr
    img = nib.load(tmp_path / "out" / "ct.nii.gz")
    assert img.shape == (512, 512, 6) and np.isclose(img.header.get_zooms()[2], 2.0)


def test_duplicated_position(real_data, tmp_path, verse):
    files = copy_series(real_data, tmp_path / "in", n=5)
    shutil.copyfile(files[2], tmp_path / "in" / "copy.dcm")
    proc = verse("anonymize", tmp_path / "in", tmp_path / "out" / "ct.nii.gz")
    assert_failed_cleanly(proc, tmp_path / "out", "duplicated slice position")


def test_uneven_spacing(real_data, tmp_path, verse):
    files = copy_series(real_data, tmp_path / "in", n=5)

    def move(ds):
        ds.ImagePositionPatient = [*map(float, ds.ImagePositionPatient[:2]), float(ds.ImagePositionPatient[2]) + 0.7]
    edit(files[2], move)
    proc = verse("anonymize", tmp_path / "in", tmp_path / "out" / "ct.nii.gz")
    assert_failed_cleanly(proc, tmp_path / "out", "uneven slice spacing")


def test_mixed_series_refused_then_chosen(real_data, tmp_path, verse):
    files = copy_series(real_data, tmp_path / "in", n=6)
    for i, path in enumerate(files):
        uid, number = ("1.2.3.4.1", 3) if i < 3 else ("1.2.3.4.2", 4)
        edit(path, lambda ds, uid=uid, n=number: (setattr(ds, "SeriesInstanceUID", uid),
                                                  setattr(ds, "SeriesNumber", n)))
    proc = verse("anonymize", tmp_path / "in", tmp_path / "out" / "ct.nii.gz")
    assert_failed_cleanly(proc, tmp_path / "out", "2 ct series", "1.2.3.4.1", "1.2.3.4.2", "--series")
    proc = verse("anonymize", tmp_path / "in", tmp_path / "out" / "ct.nii.gz", "--series", "4")
    assert proc.returncode == 0, proc.stderr
    assert nib.load(tmp_path / "out" / "ct.nii.gz").shape == (512, 512, 3)


def _sr_document(path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
    ds.SOPInstanceUID = "1.2.3.99.1"
    ds.Modality = "SR"
    ds.PatientName = "Dose^Report"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def test_non_image_dicom(tmp_path, verse):
    (tmp_path / "in").mkdir()
    _sr_document(tmp_path / "in" / "dose.dcm")
    proc = verse("anonymize", tmp_path / "in" / "dose.dcm", tmp_path / "out" / "ct.nii.gz")
    assert_failed_cleanly(proc, tmp_path / "out", "no ct image series", "dose report")


def test_localizer_and_dose_report_are_skipped(real_data, tmp_path, verse):
    files = copy_series(real_data, tmp_path / "in", n=4)
    _sr_document(tmp_path / "in" / "dose.dcm")
    scout = tmp_path / "in" / "scout.dcm"
    shutil.copyfile(files[0], scout)
    edit(scout, lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    proc = verse("anonymize", tmp_path / "in", tmp_path / "out" / "ct.nii.gz")
    assert proc.returncode == 0, proc.stderr
    assert nib.load(tmp_path / "out" / "ct.nii.gz").shape == (512, 512, 4)


def test_truncated_file(real_data, tmp_path, verse):
    files = copy_series(real_data, tmp_path / "in", n=5)
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) // 2])
    proc = verse("anonymize", tmp_path / "in", tmp_path / "out" / "ct.nii.gz")
    assert_failed_cleanly(proc, tmp_path / "out", "truncated")


def test_undecodable_compression(real_data, tmp_path, verse):
    files = copy_series(real_data, tmp_path / "in", n=5)
    # pydicom refuses to write an unknown transfer syntax, so patch the UID in the file meta (same length).
    raw = files[1].read_bytes()
    assert raw.count(b"1.2.840.10008.1.2.4.90") == 1
    files[1].write_bytes(raw.replace(b"1.2.840.10008.1.2.4.90", b"1.2.840.10008.1.2.4.99"))
    proc = verse("anonymize", tmp_path / "in", tmp_path / "out" / "ct.nii.gz")
    assert_failed_cleanly(proc, tmp_path / "out", "no installed decoder", "im0001")


def test_gantry_tilt_refused_then_corrected(real_data, tmp_path, verse):
    files = copy_series(real_data, tmp_path / "in", n=6)
    shear = np.tan(np.radians(12.0))

    def tilt(ds):
        x, y, z = map(float, ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + shear * (z - z0), z]
        ds.GantryDetectorTilt = 12.0
    z0 = float(pydicom.dcmread(files[0], stop_before_pixels=True).ImagePositionPatient[2])
    for path in files:
        edit(path, tilt)
    proc = verse("anonymize", tmp_path / "in", tmp_path / "out" / "ct.nii.gz")
    assert_failed_cleanly(proc, tmp_path / "out", "gantry tilt of 12.00 degrees", "--correct-tilt")
    proc = verse("anonymize", tmp_path / "in", tmp_path / "out" / "ct.nii.gz", "--correct-tilt",
                 "--sidecar", tmp_path / "out" / "ct.json")
    assert proc.returncode == 0, proc.stderr
    img = nib.load(tmp_path / "out" / "ct.nii.gz")
    directions = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
    np.testing.assert_allclose(directions.T @ directions, np.eye(3), atol=1e-6)
    assert json.loads((tmp_path / "out" / "ct.json").read_text())["GantryTiltCorrectedDeg"] == pytest.approx(12, abs=0.01)


@pytest.mark.parametrize("syntax", [pydicom.uid.RLELossless, pydicom.uid.JPEGLSLossless,
                                    pydicom.uid.JPEG2000Lossless, pydicom.uid.ExplicitVRLittleEndian])
def test_other_transfer_syntaxes_give_identical_hu(real_data, tmp_path, syntax):
    from verse_cli.dicom import load_series

    files = copy_series(real_data, tmp_path / "in", n=3)
    expected = load_series(tmp_path / "in").hu
    for path in files:
        ds = pydicom.dcmread(path)
        ds.decompress()
        if syntax != pydicom.uid.ExplicitVRLittleEndian:
            ds.compress(syntax)
        ds.save_as(path)
    assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_series(tmp_path / "in").hu, expected)


def encode_jpeg_lossless(pixels: np.ndarray, precision: int) -> bytes:
    """A lossless JPEG (ITU T.81 process 14, predictor 1, one Huffman table) of one unsigned frame.

    pydicom has no encoder for the JPEG Lossless transfer syntaxes, so the round trip
    test writes its own: every difference category (0-16) gets a 5-bit code.
    """
    rows, cols = pixels.shape
    x = pixels.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]  # first line: the sample to the left
    pred[1:, 0] = x[:-1, 0]  # first sample of later lines: the one above
    pred[1:, 1:] = x[1:, :-1]  # predictor 1 (Ra) elsewhere
    diff = (x - pred).ravel()
    ssss = np.where(diff == 0, 0, np.floor(np.log2(np.abs(diff) + 0.5)).astype(np.int64) + 1)
    extra = np.where(diff < 0, diff + (1 << ssss) - 1, diff) & ((1 << ssss) - 1)
    value, nbits = (ssss << ssss) | extra, 5 + ssss  # code (= category, 5 bits) then the extra bits
    owner = np.repeat(np.arange(diff.size), nbits)
    k = np.arange(owner.size) - np.repeat(np.cumsum(nbits) - nbits, nbits)
    bits = (value[owner] >> (nbits[owner] - 1 - k)) & 1
    bits = np.concatenate([bits, np.ones((-bits.size) % 8, np.int64)])  # pad with 1-bits
    scan = np.packbits(bits.astype(np.uint8))
    scan = np.insert(scan, np.flatnonzero(scan == 0xFF) + 1, 0).astype(np.uint8)  # byte stuffing

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof3 = bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5
    dht = bytes([0x00]) + bytes(counts) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # one component, table 0, predictor 1, point transform 0
    return (b"\xff\xd8" + segment(0xC3, sof3) + segment(0xC4, dht) + segment(0xDA, sos) + scan.tobytes()
            + b"\xff\xd9")


@pytest.mark.parametrize("syntax", [pydicom.uid.JPEGLosslessSV1, pydicom.uid.JPEGLossless])
def test_jpeg_lossless_round_trip_gives_identical_hu(real_data, tmp_path, syntax):
    """JPEG Lossless (process 14) series decode, through the installed plugin, to the original HU."""
    from pydicom.encaps import encapsulate

    from verse_cli.dicom import load_series

    files = copy_series(real_data, tmp_path / "in", n=3)
    expected = load_series(tmp_path / "in").hu
    for path in files:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        ds.PixelData = encapsulate([encode_jpeg_lossless(pixels, int(ds.BitsStored))])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(path)
        np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, pixels)  # the codec itself
    assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_series(tmp_path / "in").hu, expected)


def test_bad_output_suffix_is_a_usage_error(real_data, tmp_path, verse):
    proc = verse("anonymize", real_data / SERIES, tmp_path / "ct.mha")
    assert proc.returncode == 2 and "must end in .nii" in proc.stderr
    assert not any(tmp_path.iterdir())
