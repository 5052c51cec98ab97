"""``verse synth --dicom``: the CT as a DICOM series with realistic headers and a
fictitious patient identity (names, IDs, dates, institution, free text, private tags,
nested sequences), so that ``verse anonymize`` can be exercised end to end.

Slices run along the third array axis; pixel ``(row j, column i)`` of slice ``k`` is
voxel ``(i, j, k)``, so the series converts back to exactly the same voxels and affine.
Every identifying value is recorded in ``identity.json`` beside the series (outside it),
so tests can prove that none of it survives anonymisation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

_FIRST = ["JANE", "JOHN", "MARIA", "AHMED", "LENA", "KENJI", "OLGA", "PIERRE", "AMARA", "LUCAS", "INGRID", "RAVI"]
_LAST = ["DOE", "MUSTERMANN", "ROSSI", "NGUYEN", "KOWALSKI", "SILVA", "HANSEN", "OKAFOR", "DUBOIS", "TANAKA"]
_INST = [("St. Elsewhere General Hospital", "12 Fictional Road, Springfield"),
         ("Klinikum Nirgendwo", "Beispielstrasse 5, 80000 Musterstadt"),
         ("Hopital Imaginaire", "3 rue du Songe, 75000 Paris"),
         ("Mercy Phantom Medical Center", "900 Placeholder Ave, Gotham")]
_VENDORS = [("SIEMENS", "SOMATOM Definition AS+", "SIEMENS CT VA0  COAD", 0x0019),
            ("GE MEDICAL SYSTEMS", "Revolution CT", "GEMS_ACQU_01", 0x0009),
            ("Philips", "iCT 256", "ELSCINT1", 0x01F1),
            ("TOSHIBA", "Aquilion ONE", "TOSHIBA_MEC_CT3", 0x7005)]


def fictitious_identity(seed: int) -> dict:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xD1C0]))
    first, last = str(rng.choice(_FIRST)), str(rng.choice(_LAST))
    inst, addr = _INST[int(rng.integers(0, len(_INST)))]
    year = int(rng.integers(1935, 2000))
    study_year = int(rng.integers(2008, 2025))
    return {
        "PatientName": f"{last}^{first}", "PatientID": f"PID{int(rng.integers(1e6, 1e7))}",
        "OtherPatientIDs": f"MRN-{int(rng.integers(1e5, 1e6))}",
        "PatientBirthDate": f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 28)):02d}",
        "PatientSex": str(rng.choice(["F", "M"])), "PatientAge": f"{study_year - year:03d}Y",
        "PatientWeight": f"{rng.uniform(50, 110):.1f}", "PatientAddress": f"{int(rng.integers(1, 99))} Dream Lane",
        "StudyDate": f"{study_year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 28)):02d}",
        "StudyTime": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        "AccessionNumber": f"ACC{int(rng.integers(1e7, 1e8))}", "InstitutionName": inst,
        "InstitutionAddress": addr, "ReferringPhysicianName": f"{rng.choice(_LAST)!s}^{rng.choice(_FIRST)!s}",
        "OperatorsName": f"{rng.choice(_LAST)!s}^{rng.choice(_FIRST)!s}",
        "StationName": f"CTSCAN{int(rng.integers(1, 9))}",
        "ImageComments": f"Spine CT for {first} {last}, back pain, call ext. {int(rng.integers(1000, 9999))}",
        "RequestedProcedureID": f"RP{int(rng.integers(1e5, 1e6))}",
    }


def write_dicom_series(ct: np.ndarray, affine: np.ndarray, outdir, seed: int = 0,
                       identity: dict | None = None) -> Path:
    """Write ``ct`` (int16 HU) as one DICOM file per slice into ``outdir`` (atomically)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    from ..core.io import write_json

    ident = dict(identity or fictitious_identity(seed))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xD1C1]))
    vendor, model, creator, group = _VENDORS[int(rng.integers(0, len(_VENDORS)))]
    outdir = Path(outdir)
    A = np.asarray(affine, dtype=float)
    sp = np.sqrt((A[:3, :3] ** 2).sum(0))
    flip = np.array([-1.0, -1.0, 1.0])  # RAS -> LPS
    col_dir = A[:3, 0] / sp[0] * flip
    row_dir = A[:3, 1] / sp[1] * flip
    ct = np.asarray(ct)
    unsigned = bool(ct.min() >= -1024 and rng.random() < 0.6)
    intercept = -1024 if unsigned else 0
    uid = lambda tag: generate_uid(entropy_srcs=[str(seed), tag])
    study_uid, series_uid, frame_uid = uid("study"), uid("series"), uid("frame")
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    try:
        for k in range(ct.shape[2]):
            ds = Dataset()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = uid(f"sop{k}")
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
            ds.file_meta = meta
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.Modality = "CT"
            ds.Manufacturer = vendor
            ds.ManufacturerModelName = model
            ds.DeviceSerialNumber = str(int(rng.integers(10000, 99999)))
            ds.SoftwareVersions = "syngo CT VA48A" if vendor == "SIEMENS" else "1.0"
            for key in ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "PatientSex",
                        "PatientAge", "PatientWeight", "PatientAddress", "StudyDate", "StudyTime",
                        "AccessionNumber", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
                        "OperatorsName", "StationName", "ImageComments"):
                setattr(ds, key, ident[key])
            ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident["StudyDate"]
            ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ident["StudyTime"]
            ds.StudyDescription = "CT SPINE"
            ds.SeriesDescription = "Spine 1.0 Br60 (synthetic)"
            ds.StudyID = "1"
            ds.SeriesNumber = 3
            ds.AcquisitionNumber = 1
            ds.InstanceNumber = k + 1
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.BodyPartExamined = "SPINE"
            ds.KVP = "120"
            ds.SliceThickness = f"{sp[2]:.4f}"
            ds.SpacingBetweenSlices = f"{sp[2]:.4f}"
            ds.PixelSpacing = [f"{sp[1]:.6f}", f"{sp[0]:.6f}"]
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([col_dir, row_dir])]
            pos = (A[:3, :3] @ np.array([0.0, 0.0, k]) + A[:3, 3]) * flip
            ds.ImagePositionPatient = [f"{v:.5f}" for v in pos]
            ds.SliceLocation = f"{pos[2]:.5f}"
            ds.PatientPosition = "HFS"
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = int(ct.shape[1]), int(ct.shape[0])
            ds.BitsAllocated = 16
            ds.BitsStored = 16 if not unsigned else 12
            ds.HighBit = ds.BitsStored - 1
            ds.PixelRepresentation = 0 if unsigned else 1
            ds.RescaleIntercept = str(intercept)
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.WindowCenter = "400"
            ds.WindowWidth = "1800"
            plane = ct[:, :, k].T.astype(np.int32) - intercept
            ds.PixelData = plane.astype(np.uint16 if unsigned else np.int16).tobytes()
            # nested sequences with identifying content
            req = Dataset()
            req.RequestedProcedureID = ident["RequestedProcedureID"]
            req.ScheduledProcedureStepID = ident["AccessionNumber"] + "-1"
            req.RequestedProcedureDescription = f"CT spine {ident['PatientName']}"
            ds.RequestAttributesSequence = Sequence([req])
            ref = Dataset()
            ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
            ref.ReferencedSOPInstanceUID = uid("refpatient")
            code = Dataset()
            code.CodeValue = "CTSPINE"
            code.CodingSchemeDesignator = "L"
            code.CodeMeaning = f"Spine for {ident['PatientName']}"
            ds.ProcedureCodeSequence = Sequence([code])
            ds.ReferencedStudySequence = Sequence([ref])
            # vendor private tags that carry identity (as real scanners do)
            block = ds.private_block(group, creator, create=True)
            block.add_new(0x10, "LO", f"{ident['PatientName']} {ident['PatientID']}")
            block.add_new(0x11, "LO", ident["InstitutionName"])
            block.add_new(0x12, "DS", f"{rng.uniform(5, 25):.2f}")
            ds.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
        if outdir.exists():
            shutil.rmtree(outdir)
        os.replace(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json(ident, outdir.parent / f"{outdir.name}_identity.json")
    return outdir


def read_dicom_series(folder) -> tuple[np.ndarray, np.ndarray]:
    """Read a series written by :func:`write_dicom_series` back to (HU int16, affine)."""
    import pydicom

    files = sorted(Path(folder).glob("*.dcm"))
    dss = [pydicom.dcmread(f) for f in files]
    dss.sort(key=lambda d: int(d.InstanceNumber))
    first = dss[0]
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    ps = [float(v) for v in first.PixelSpacing]
    flip = np.array([-1.0, -1.0, 1.0])
    p0 = np.array([float(v) for v in first.ImagePositionPatient]) * flip
    A = np.eye(4)
    A[:3, 0] = iop[:3] * flip * ps[1]
    A[:3, 1] = iop[3:] * flip * ps[0]
    if len(dss) > 1:
        p1 = np.array([float(v) for v in dss[1].ImagePositionPatient]) * flip
        A[:3, 2] = p1 - p0
    else:
        A[:3, 2] = np.cross(A[:3, 0], A[:3, 1]) / (ps[0] * ps[1]) * float(first.SliceThickness)
    A[:3, 3] = p0
    vol = np.stack([d.pixel_array.T.astype(np.int32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                    for d in dss], axis=2)
    return vol.astype(np.int16), A
