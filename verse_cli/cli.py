"""The ``verse`` command: a thin typer layer that parses arguments and reports.

Each command imports its stage module lazily, so ``verse --help`` never loads numpy
or torch. Stages raise :class:`~verse_cli.core.errors.VerseError` for expected
failures; :func:`main` prints them as one line on stderr and exits 1 (bad data) or
2 (bad usage).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .core.errors import UsageError, VerseError

app = typer.Typer(
    name="verse",
    help="Turn raw spine CT scans into an annotated, VerSe-style dataset.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
train_app = typer.Typer(help="Train the bundled models (detect, label, segment).", no_args_is_help=True)
app.add_typer(train_app, name="train")

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and warnings.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="More detail on stderr.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda or auto (CUDA when present).")]


def _setup(quiet: bool, verbose: bool) -> None:
    from .core.progress import set_verbosity

    if quiet and verbose:
        raise UsageError("--quiet and --verbose exclude each other")
    set_verbosity(quiet=quiet, verbose=verbose)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"verse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool | None, typer.Option("--version", callback=_version_callback, is_eager=True,
                                                    help="Show the version and exit.")] = None,
) -> None:
    """Turn raw spine CT scans into an annotated, VerSe-style dataset."""


# --------------------------------------------------------------------------- anonymize / deface
@app.command()
def anonymize(
    input: Annotated[Path, typer.Argument(help="DICOM folder (searched recursively), DICOM file or NIfTI.")],
    output: Annotated[Path, typer.Argument(help="Output NIfTI (.nii.gz).")],
    sidecar: Annotated[Path | None, typer.Option(help="Sidecar JSON of non-identifying metadata.")] = None,
    subject: Annotated[str | None, typer.Option(help="Subject pseudonym (generated if absent).")] = None,
    keymap: Annotated[Path | None, typer.Option(help="CSV that maps PatientID to pseudonym.")] = None,
    date_shift_days: Annotated[int | None, typer.Option(help="Shift dates by N days instead of removing.")] = None,
    series: Annotated[str | None, typer.Option(help="SeriesInstanceUID or SeriesNumber to convert.")] = None,
    keep_demographics: Annotated[bool, typer.Option(help="Keep patient age and sex.")] = False,
    resample_uneven: Annotated[bool, typer.Option(help="Resample uneven slice spacing.")] = False,
    correct_tilt: Annotated[bool, typer.Option(help="Resample gantry-tilted series.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """DICOM series or NIfTI in, identity-free NIfTI out (plus a sidecar)."""
    _setup(quiet, verbose)
    from .anonymize import anonymize as run

    run(input, output, sidecar=sidecar, subject=subject, keymap=keymap, date_shift_days=date_shift_days,
        series=series, keep_demographics=keep_demographics, resample_uneven=resample_uneven,
        correct_tilt=correct_tilt)


@app.command()
def deface(
    ct: Annotated[Path, typer.Argument(help="Input CT NIfTI.")],
    out: Annotated[Path, typer.Argument(help="Defaced CT NIfTI.")],
    mask: Annotated[Path | None, typer.Option(help="Hand-drawn face mask.")] = None,
    auto: Annotated[bool, typer.Option("--auto", help="Find the face automatically.")] = False,
    fill: Annotated[float, typer.Option(help="HU written into the face.")] = -1024,
    margin_mm: Annotated[float, typer.Option(help="Dilation of the face mask in mm.")] = 5.0,
    save_mask: Annotated[Path | None, typer.Option(help="Write the face mask used.")] = None,
    sidecar: Annotated[Path | None, typer.Option(help="Sidecar JSON to record the defacing in.")] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Remove the face from a CT, with a hand-drawn mask or automatically."""
    _setup(quiet, verbose)
    from .deface import deface as run

    run(ct, out, mask=mask, auto=auto, fill=fill, margin_mm=margin_mm, save_mask_path=save_mask, sidecar=sidecar)


# --------------------------------------------------------------------------- detect / label
@app.command()
def detect(
    ct: Annotated[Path, typer.Argument(help="Input CT NIfTI.")],
    heatmap: Annotated[Path, typer.Option(help="Output spine heatmap NIfTI (coarse grid).")],
    bbox: Annotated[Path, typer.Option(help="Output bounding-box JSON ('-' for stdout).")],
    model: Annotated[Path | None, typer.Option(help="Model weights (default: bundled).")] = None,
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Spine heatmap and bounding box from a low-resolution CNN."""
    _setup(quiet, verbose)
    from .detect import run_detect

    run_detect(ct, heatmap, bbox, model=model, device=device)


@app.command()
def label(
    ct: Annotated[Path | None, typer.Argument(help="Input CT NIfTI.")] = None,
    bbox: Annotated[Path | None, typer.Option(help="Bounding-box JSON from 'verse detect'.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output centroid JSON ('-' for stdout).")] = Path("-"),
    model: Annotated[Path | None, typer.Option(help="Model weights (default: bundled).")] = None,
    markers: Annotated[Path | None, typer.Option(help="Also write a marker NIfTI for ITK-SNAP.")] = None,
    fix: Annotated[Path | None, typer.Option(help="User-corrected centroid JSON (hard constraints).")] = None,
    fix_markers: Annotated[Path | None, typer.Option(help="User-corrected marker NIfTI.")] = None,
    from_markers: Annotated[Path | None, typer.Option(help="Convert an edited marker NIfTI to JSON.")] = None,
    upright: Annotated[bool, typer.Option(help="Label a spine that leans over 15 degrees again on a grid turned "
                                               "upright (the net was trained on tilts up to 15 degrees).")] = True,
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Vertebra body centroids with anatomical labels."""
    _setup(quiet, verbose)
    from .label import run

    run(ct, bbox, output, model=model, markers=markers, fix=fix, fix_markers=fix_markers,
        from_markers_path=from_markers, device=device, upright=upright)


# --------------------------------------------------------------------------- segment / merge
@app.command()
def segment(
    ct: Annotated[Path, typer.Argument(help="Input CT NIfTI.")],
    ctd: Annotated[Path, typer.Option(help="Centroid JSON.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output patch folder.")],
    model: Annotated[Path | None, typer.Option(help="Model weights (default: bundled).")] = None,
    only: Annotated[str | None, typer.Option(help="Comma-separated vertebrae to (re)run, e.g. L3,L4.")] = None,
    batch: Annotated[int, typer.Option(help="Patches per forward pass.")] = 4,
    recentre: Annotated[bool, typer.Option(help="Segment a vertebra again around the body its patch found when "
                                                "that lies 3-15 mm from the given centroid.")] = True,
    mirror: Annotated[bool, typer.Option(help="Also run each patch mirrored left-right and average the two "
                                              "(segment takes about 1.6x as long; +0.2 Dice points on synthetic scans).")] = True,
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Segment each vertebra in its own 1 mm patch."""
    _setup(quiet, verbose)
    from .segment import segment as segment_patches

    segment_patches(ct, ctd, model=model, only=only, batch=batch, device=device, out_dir=output, recentre=recentre,
                     mirror=mirror)


@app.command()
def merge(
    ct: Annotated[Path, typer.Argument(help="The CT whose grid the mask takes.")],
    patch_dir: Annotated[Path, typer.Argument(help="Patch folder from 'verse segment'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output multi-label mask NIfTI.")],
    itksnap_labels: Annotated[Path | None, typer.Option(help="Also write an ITK-SNAP label file.")] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Merge per-vertebra patches into one mask on the CT grid."""
    _setup(quiet, verbose)
    from .merge import run as merge_patches

    merge_patches(ct, patch_dir, output, itksnap_labels)


# --------------------------------------------------------------------------- centroids / evaluate
@app.command()
def centroids(
    mask: Annotated[Path, typer.Argument(help="Vertebra mask NIfTI (VerSe ids).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output centroid JSON ('-' for stdout).")] = Path("-"),
    whole: Annotated[bool, typer.Option("--whole", help="Whole-vertebra centres of mass, not body centroids.")] = False,
    markers: Annotated[Path | None, typer.Option(help="Also write a marker NIfTI for ITK-SNAP.")] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Mask to VerSe centroid JSON (vertebral-body centroids by default)."""
    _setup(quiet, verbose)
    from . import centroids as stage

    stage.run(mask, output, whole=whole, markers=markers)


@app.command()
def evaluate(
    pred: Annotated[Path | None, typer.Argument(help="Predicted mask.")] = None,
    gt: Annotated[Path | None, typer.Argument(help="Ground-truth mask.")] = None,
    pred_ctd: Annotated[Path | None, typer.Option(help="Predicted centroid JSON.")] = None,
    gt_ctd: Annotated[Path | None, typer.Option(help="Ground-truth centroid JSON.")] = None,
    pred_dir: Annotated[Path | None, typer.Option(help="Dataset mode: folder of predictions.")] = None,
    gt_dir: Annotated[Path | None, typer.Option(help="Dataset mode: folder of ground truth.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="JSON report ('-' for stdout).")] = None,
    csv: Annotated[Path | None, typer.Option(help="Per-vertebra CSV ('-' for stdout).")] = None,
    resample_pred: Annotated[bool, typer.Option(help="Resample the prediction onto the GT grid.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """VerSe metrics: Dice, Hausdorff, surface distance, identification rate."""
    _setup(quiet, verbose)
    from . import evaluate as stage

    stage.run(pred, gt, pred_ctd=pred_ctd, gt_ctd=gt_ctd, pred_dir=pred_dir, gt_dir=gt_dir, output=output,
              csv=csv, resample_pred=resample_pred)


@app.command("rate-variants")
def rate_variants(
    ct: Annotated[Path, typer.Argument(help="CT NIfTI, or a dataset folder in dataset mode.")],
    mask: Annotated[Path | None, typer.Argument(help="Vertebra mask NIfTI.")] = None,
    ctd: Annotated[Path | None, typer.Option(help="Centroid JSON.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output JSON ('-' for stdout); in dataset "
                                         "mode the summary CSV.")] = Path("-"),
    stump_mm: Annotated[float, typer.Option(help="Ribs shorter than this are stump ribs (mm).")] = 38.0,
    no_ct: Annotated[bool, typer.Option("--no-ct", help="Rate a mask alone (CT argument is the mask): "
                                        "enumeration only.")] = False,
    out_dir: Annotated[Path | None, typer.Option(help="Dataset mode: also write sub-X_variants.json "
                                                    "here.")] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Rate enumeration anomalies, ribs, cervical ribs and Castellvi grade."""
    _setup(quiet, verbose)
    from .variants import run_command

    run_command(ct, mask, ctd, output, stump_mm=stump_mm, no_ct=no_ct, out_dir=out_dir)


# --------------------------------------------------------------------------- synth / snapshot / report
@app.command()
def synth(
    outdir: Annotated[Path, typer.Argument(help="Output folder for VerSe-named cases.")],
    n: Annotated[int, typer.Option("--n", help="Number of cases.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the first case.")] = 0,
    region: Annotated[str, typer.Option(help="cervical, thoracic, lumbar, thoracolumbar, whole or random.")] = "random",
    variant: Annotated[str | None, typer.Option(help="Force a variant: none, T11, T13, L4, L6, cervical_rib, "
                                                       "stump_rib, castellvi[_1|_2a|_2b|_3a|_3b|_4].")] = None,
    spacing: Annotated[str | None, typer.Option(help="Voxel size in mm along the array axes: 'S' or 'SX,SY,SZ'.")] = None,
    orientation: Annotated[str | None, typer.Option(help="Axis codes of the array, e.g. PIR, RAS, LPS.")] = None,
    scale: Annotated[float, typer.Option(help="Size factor: the grid is capped at 40 M x scale^3 voxels (fast cases).")] = 1.0,
    size: Annotated[float | None, typer.Option("--size", help="Largest grid in megavoxels (default 40 x scale^3).")] = None,
    from_masks: Annotated[Path | None, typer.Option("--from-masks", help="Render CTs from the vertebra masks in this folder.")] = None,
    dicom: Annotated[bool, typer.Option("--dicom", help="Also write each CT as a DICOM series.")] = False,
    qc: Annotated[bool, typer.Option("--qc/--no-qc", help="Write a QC PNG per case.")] = True,
    ribs: Annotated[bool, typer.Option("--ribs", help="Also write the rib mask (_seg-rib_msk.nii.gz).")] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Cases rendered in parallel.")] = 1,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Synthetic spine CT with full ground truth."""
    _setup(quiet, verbose)
    from .synth.cli_entry import run_synth

    run_synth(outdir, n=n, seed=seed, region=region, variant=variant, spacing=spacing, orientation=orientation,
              scale=scale, size=size, from_masks=from_masks, dicom=dicom, qc=qc, ribs=ribs, jobs=jobs)


@app.command()
def snapshot(
    ct: Annotated[Path, typer.Argument(help="CT NIfTI.")],
    mask: Annotated[Path | None, typer.Argument(help="Vertebra mask NIfTI.")] = None,
    ctd: Annotated[Path | None, typer.Option(help="Centroid JSON.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output PNG.")] = Path("snapshot.png"),
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """QC picture: sagittal and coronal views with the mask and centroids."""
    _setup(quiet, verbose)
    from . import snapshot as stage

    stage.write_snapshot(ct, mask, ctd, output)


@app.command()
def report(
    deriv_dir: Annotated[Path, typer.Argument(help="Derivatives folder of a dataset.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output HTML.")] = Path("report.html"),
    embed: Annotated[bool, typer.Option("--embed", help="Embed the pictures (one self-contained file).")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """One static HTML page per dataset."""
    _setup(quiet, verbose)
    from . import report as stage

    stage.write_report(deriv_dir, output, embed=embed)


# --------------------------------------------------------------------------- train
@train_app.command("detect")
def train_detect(
    data_dir: Annotated[Path | None, typer.Argument(help="VerSe-layout dataset (omit for on-the-fly synth).")] = None,
    out: Annotated[Path, typer.Option(help="Output weights.")] = Path("models/detect.pt"),
    minutes: Annotated[float | None, typer.Option(help="Time budget in minutes (data preparation included).")] = 10.0,
    epochs: Annotated[int | None, typer.Option(help="Stop after this many epochs.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (split, augmentation, initial weights).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint beside --out.")] = False,
    workers: Annotated[int, typer.Option(help="DataLoader / data preparation worker processes.")] = 2,
    batch: Annotated[int, typer.Option(help="Crops per step.")] = 2,
    synth: Annotated[int, typer.Option("--synth", help="Also generate N synthetic cases on the fly (4 mm).")] = 0,
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Train the spine detector."""
    _setup(quiet, verbose)
    from .nets.detect_net import train_detect as run

    run(data_dir, out, minutes=minutes, epochs=epochs, device=device, seed=seed, resume=resume, workers=workers,
        synth=synth, batch=batch)


@train_app.command("label")
def train_label(
    data_dir: Annotated[Path | None, typer.Argument(help="VerSe-layout dataset (omit for on-the-fly synth).")] = None,
    out: Annotated[Path, typer.Option(help="Output weights.")] = Path("models/label.pt"),
    minutes: Annotated[float | None, typer.Option(help="Training time budget in minutes.")] = 15.0,
    epochs: Annotated[int | None, typer.Option(help="Stop after this many epochs.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint beside --out.")] = False,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 2,
    batch: Annotated[int | None, typer.Option(help="Projection pairs per step (default 32 on CUDA, 8 on CPU).")] = None,
    n_synth: Annotated[int, typer.Option(help="Cases to generate when DATA_DIR is omitted.")] = 200,
    init: Annotated[Path | None, typer.Option(help="Fine-tune these weights (keeps their input preprocessing).",
                                              exists=True, dir_okay=False)] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (lower it with --init, e.g. 5e-4).")] = 2e-3,
    real_views: Annotated[int, typer.Option(help="Real-scan augmented projections per case, besides the plain one.",
                                            min=0)] = 1,
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Train the vertebra labelling net (Btrfly Net on sagittal and coronal MIPs)."""
    _setup(quiet, verbose)
    from .nets.btrfly import train

    train(data_dir, out=out, minutes=minutes, epochs=epochs, device=device, seed=seed, resume=resume,
          workers=workers, batch_size=batch, n_synth=n_synth, init=init, lr=lr, real_views=real_views)


@train_app.command("segment")
def train_segment(
    data_dir: Annotated[Path | None, typer.Argument(help="VerSe-layout dataset (omit for on-the-fly synth).")] = None,
    out: Annotated[Path, typer.Option(help="Output weights.")] = Path("models/segment.pt"),
    minutes: Annotated[float | None, typer.Option(help="Training time budget in minutes.")] = 15.0,
    epochs: Annotated[int | None, typer.Option(help="Stop after this many epochs.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint beside --out.")] = False,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 2,
    batch: Annotated[int, typer.Option(help="Cases per step (each gives 16 slabs).")] = 2,
    crop: Annotated[int | None, typer.Option(help="Train on CROP x CROP windows (cheaper CPU steps).")] = None,
    init: Annotated[Path | None, typer.Option(help="Fine-tune these weights (keeps their patch configuration).",
                                              exists=True, dir_okay=False)] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (lower it with --init, e.g. 5e-4).")] = 2e-3,
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Train the per-vertebra segmentation U-Net."""
    _setup(quiet, verbose)
    from .nets.train_segment import train

    train(data_dir, out=out, minutes=minutes, epochs=epochs, device=device, seed=seed, resume=resume,
          workers=workers, batch=batch, crop=crop, init=init, lr=lr)


# --------------------------------------------------------------------------- entry point
def _terminated(signum, frame) -> None:
    # SIGTERM (make, SLURM, kill) unwinds like Ctrl-C, so atomic writes remove their temp files
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected errors become one line on stderr."""
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    try:
        app(args=argv, prog_name="verse")
    except VerseError as exc:
        sys.stderr.write(f"verse: error: {exc}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("verse: interrupted\n")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
