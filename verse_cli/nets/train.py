"""The training framework shared by ``verse train detect``, ``label`` and ``segment``.

What every trainer needs and nothing model-specific:

* :func:`discover_cases` finds cases in a VerSe-layout dataset (``rawdata/`` +
  ``derivatives/``) or in flat folders of VerSe-named files; :func:`split_cases` makes a
  seeded train/validation split by subject.
* :func:`pick_device` turns ``auto|cpu|cuda`` into a :class:`torch.device`;
  :func:`seed_everything` and :func:`make_loader` give reproducible data order and
  per-worker random streams.
* :func:`fit` runs the optimisation loop: time or epoch budget, cosine learning rate
  with warm-up, mixed precision on CUDA, validation after every epoch, the best weights
  saved atomically as a *bundle*, a checkpoint for ``--resume``, a JSONL training log
  beside the output and a rich progress bar on a terminal.
* :func:`save_bundle` / :func:`load_bundle` read and write the ``.pt`` files shipped in
  ``models/``; :func:`model_hash` is the 12-hex sha256 that JSON outputs cite.

A trainer provides a model (with ``arch`` and ``config`` attributes, so the bundle
can rebuild it), batches (any re-iterable, usually a DataLoader), and two functions::

    step_fn(model, batch, device) -> loss tensor          # training step (forward + loss)
    val_fn(model, batch, device) -> {"loss": float, ...}  # metrics, averaged over batches

Example
-------
>>> cases = discover_cases("work/synth_train")                     # doctest: +SKIP
>>> train, val = split_cases(cases, val_fraction=0.15, seed=0)     # doctest: +SKIP
>>> fit(model, train_loader, val_loader, step, validate, out="models/x.pt",
...     minutes=5, lr=1e-3, seed=0, device=pick_device("auto"))    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DataError, UsageError
from ..core.io import atomic_path, dumps_json
from ..core.progress import debug, info, task, warn

BUNDLE_FORMAT = "verse-cli-model/1"

# sub-<id>[_<key>-<value>...]_<suffix>.<ext>; the seg-/desc- entities describe the file, the
# others (dir-ax, ses-..., label-...) belong to the subject key.
_VERSE_NAME = re.compile(
    r"^sub-(?P<sub>[A-Za-z0-9]+)(?P<ents>(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)_(?P<suffix>[A-Za-z0-9]+)"
    r"\.(?P<ext>nii\.gz|nii|json)$"
)
_FILE_ENTITIES = ("seg", "desc")


# --------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class CaseFiles:
    """The files of one subject; optional ones are ``None`` when absent.

    ``subject`` is the id without ``sub-`` (``"syn10001"``, ``"gl003_dir-ax"``).
    """

    subject: str
    ct: Path
    mask: Path | None = None
    ctd: Path | None = None
    variants: Path | None = None


def _parse_name(name: str) -> tuple[str, dict[str, str], str, str] | None:
    m = _VERSE_NAME.match(name)
    if not m:
        return None
    ents = dict(e.split("-", 1) for e in m.group("ents").split("_") if e)
    subject_ents = "".join(f"_{k}-{v}" for k, v in ents.items() if k not in _FILE_ENTITIES)
    file_ents = {k: v for k, v in ents.items() if k in _FILE_ENTITIES}
    return m.group("sub") + subject_ents, file_ents, m.group("suffix"), m.group("ext")


def _role(file_ents: dict[str, str], suffix: str, ext: str) -> tuple[str, int] | None:
    """Which CaseFiles field a file fills, and its preference (lower wins)."""
    nifti = ext in ("nii", "nii.gz")
    if suffix == "ct" and nifti:
        return "ct", 0 if "desc" not in file_ents else 1  # the raw CT beats the defaced copy
    if suffix == "msk" and nifti and file_ents.get("seg") == "vert":
        return "mask", 0
    if suffix == "ctd" and ext == "json":
        return "ctd", {"subreg": 0, "vb": 1}.get(file_ents.get("seg", ""), 2)
    if suffix == "variants" and ext == "json":
        return "variants", 0
    return None


def discover_cases(data_dir: str | os.PathLike) -> list[CaseFiles]:
    """All subjects with a CT under ``data_dir``, sorted by subject id.

    Works for the VerSe layout (``rawdata/sub-X/sub-X_ct.nii.gz`` and
    ``derivatives/sub-X/sub-X_seg-vert_msk.nii.gz``) and for any folder tree of
    VerSe-named files (as ``verse synth`` writes them). Files are matched by name only:
    ``_ct`` (the plain CT is preferred over ``_desc-defaced_ct``), ``_seg-vert_msk``,
    ``_seg-subreg_ctd`` (or ``_seg-vb_ctd``) and ``_variants.json``. Hidden folders are
    skipped.

    Raises
    ------
    DataError
        If ``data_dir`` is not a folder or holds no CT.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError("no such dataset folder", root)
    found: dict[str, dict[str, tuple[int, Path]]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            parsed = _parse_name(fname)
            if parsed is None:
                continue
            subject, file_ents, suffix, ext = parsed
            role = _role(file_ents, suffix, ext)
            if role is None:
                continue
            field, rank = role
            slot = found.setdefault(subject, {})
            if field not in slot or rank < slot[field][0]:
                slot[field] = (rank, Path(dirpath) / fname)
    cases = [
        CaseFiles(subject=s, **{k: p for k, (_, p) in files.items()})
        for s, files in sorted(found.items())
        if "ct" in files
    ]
    if not cases:
        raise DataError("no CT found (expected files named sub-<id>_ct.nii.gz)", root)
    return cases


def split_cases(cases: list, val_fraction: float = 0.15, seed: int = 0) -> tuple[list, list]:
    """Seeded split into ``(train, val)``, each in the input order.

    At least one case goes to validation when there are two or more cases and
    ``val_fraction > 0``; the training part is never empty.
    """
    if not 0 <= val_fraction < 1:
        raise UsageError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    n = len(cases)
    n_val = 0 if n < 2 or val_fraction == 0 else min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [c for i, c in enumerate(cases) if i not in val_idx]
    val = [c for i, c in enumerate(cases) if i in val_idx]
    return train, val


# --------------------------------------------------------------------------- devices and seeds
def pick_device(name: str = "auto"):
    """``auto`` is CUDA when available, else CPU; asking for absent CUDA is a usage error."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        return torch.device(name)
    raise UsageError(f"--device must be cpu, cuda or auto, got {name!r}")


def cpu_threads() -> int:
    """Intra-op threads for torch on the CPU: 1 when the machine is oversubscribed.

    OpenMP threads that wait for each other at every operation are 10-20x slower
    than a single thread once other processes hold the cores (measured on a shared
    2-core machine: a training step took 22 s with 2 threads and 1.5 s with 1).
    """
    import torch

    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= 0.75 * cores
    except OSError:
        busy = False
    return 1 if busy else max(1, min(torch.get_num_threads(), cores))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream for one sample: the same whatever the number of workers."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def make_loader(dataset, batch_size: int = 1, shuffle: bool = True, workers: int = 0, seed: int = 0,
                device=None, collate_fn=None, drop_last: bool = False):
    """A DataLoader with a seeded order; pinned memory on CUDA.

    Workers are not persistent, so :func:`fit`'s per-epoch ``dataset.set_epoch`` reaches
    them (on Linux forking them is cheap and shares the cached arrays).
    """
    import torch
    from torch.utils.data import DataLoader

    gen = torch.Generator()
    gen.manual_seed(int(seed))
    cuda = device is not None and torch.device(device).type == "cuda"
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=max(0, int(workers)),
        generator=gen,
        pin_memory=cuda,
        collate_fn=collate_fn,
        drop_last=drop_last,
    )


def _set_epoch(batches, epoch: int, seed: int) -> None:
    dataset = getattr(batches, "dataset", batches)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    gen = getattr(batches, "generator", None)
    if gen is not None:
        gen.manual_seed(int(seed) * 100003 + epoch)


# --------------------------------------------------------------------------- bundles
def _plain(obj: Any) -> Any:
    """JSON-like copy (numpy scalars, Paths -> plain types) that ``weights_only`` loading accepts."""
    return json.loads(dumps_json(obj))


def save_bundle(path: str | os.PathLike, arch: str, config: dict, state_dict: dict, meta: dict | None = None) -> None:
    """Write a model bundle atomically: ``{format, arch, config, state_dict, meta}``.

    ``config`` holds the constructor arguments of ``arch``; ``meta`` free JSON-like
    facts (training data, metrics, time). Tensors are moved to the CPU.
    """
    import torch

    payload = {
        "format": BUNDLE_FORMAT,
        "arch": str(arch),
        "config": _plain(config or {}),
        "state_dict": {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()},
        "meta": _plain(meta or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_bundle(path: str | os.PathLike, map_location="cpu") -> tuple[str, dict, dict, dict]:
    """Read a bundle written by :func:`save_bundle`: ``(arch, config, state_dict, meta)``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError("no such model file", path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign or truncated files
        raise DataError(f"not a readable model bundle ({str(exc).splitlines()[0][:120]})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
        raise DataError(f"not a verse-cli model bundle (expected format {BUNDLE_FORMAT})", path)
    return payload["arch"], payload["config"], payload["state_dict"], payload["meta"]


def model_hash(path: str | os.PathLike) -> str:
    """First 12 hex digits of the sha256 of a weights file (cited in JSON outputs)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def checkpoint_path(out: str | os.PathLike) -> Path:
    """``models/x.pt`` -> ``models/x.ckpt`` (model, optimiser and loop state for ``--resume``)."""
    out = Path(out)
    return out.with_name(out.stem + ".ckpt")


def log_path(out: str | os.PathLike) -> Path:
    """``models/x.pt`` -> ``models/x.log.jsonl`` (one JSON object per epoch)."""
    out = Path(out)
    return out.with_name(out.stem + ".log.jsonl")


# --------------------------------------------------------------------------- the loop
def _lr_factor(progress: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to 5 % over ``progress`` in [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return warm * cosine


def _evaluate(model, val_batches, val_fn, device) -> dict[str, float]:
    import torch

    if val_batches is None:
        return {}
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        for batch in val_batches:
            for key, value in val_fn(model, batch, device).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            n += 1
    return {k: v / n for k, v in sums.items()} if n else {}


def _better(value: float, best: float | None, mode: str) -> bool:
    if best is None or not math.isfinite(best):
        return math.isfinite(value)
    return value < best if mode == "min" else value > best


def fit(
    model,
    train_batches: Iterable,
    val_batches: Iterable | None,
    step_fn: Callable,
    val_fn: Callable | None,
    *,
    out: str | os.PathLike,
    epochs: int | None = None,
    minutes: float | None = None,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    resume: bool = False,
    log: str | os.PathLike | None = None,
    device="cpu",
    meta: dict | None = None,
    arch: str | None = None,
    config: dict | None = None,
    monitor: str = "loss",
    mode: str = "min",
    warmup_steps: int = 50,
    grad_clip: float | None = 1.0,
    amp: bool = True,
) -> dict:
    """Train ``model`` and keep the best weights in the bundle ``out``.

    Parameters
    ----------
    train_batches, val_batches
        Re-iterable batch sources (DataLoaders). If the dataset has ``set_epoch(e)``
        it is called before each epoch, so augmentation can be seeded by epoch.
    step_fn, val_fn
        ``step_fn(model, batch, device) -> loss`` and ``val_fn(model, batch, device) ->
        dict`` of floats (averaged over validation batches; ``monitor`` picks the one that
        decides the best model, lower is better with ``mode="min"``).
    epochs, minutes
        Stop after this many epochs (in total, counting resumed ones) and/or after this
        many minutes of this run, whichever comes first; at least one is required.
        The time budget is checked after every step, so it is respected to within one
        step plus one validation pass.
    resume
        Continue from ``checkpoint_path(out)`` (model, optimiser, epoch, best score,
        torch RNG); the learning-rate schedule restarts over the new budget.
    log
        JSONL training log (default ``log_path(out)``), one object per epoch; truncated
        unless resuming.
    amp
        bfloat16 autocast on CUDA (ignored on CPU).

    Returns
    -------
    dict
        ``epochs``, ``steps``, ``best`` (the monitored value), ``best_epoch``,
        ``seconds`` (this run), ``out``, ``log``, ``checkpoint``, ``last`` metrics.
    """
    import torch

    if epochs is None and minutes is None:
        raise UsageError("give a training budget: epochs or minutes")
    if minutes is not None and minutes <= 0:
        raise UsageError(f"--minutes must be positive, got {minutes}")
    device = torch.device(device)
    out = Path(out)
    log = Path(log) if log is not None else log_path(out)
    ckpt = checkpoint_path(out)
    arch = arch or getattr(model, "arch", type(model).__name__)
    config = config if config is not None else getattr(model, "config", {})
    seed_everything(seed)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "seconds_total": 0.0}

    if resume and ckpt.is_file():
        saved = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update(saved["state"])
        torch.set_rng_state(saved["torch_rng"].cpu())
        info(f"resuming from {ckpt} at epoch {state['epoch']} (best {monitor} {state['best']})")
    else:
        if resume:
            warn(f"--resume: no checkpoint at {ckpt}; starting from scratch")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")

    use_amp = amp and device.type == "cuda"
    budget = None if minutes is None else 60.0 * minutes
    start = time.monotonic()
    start_epoch = state["epoch"]
    seconds_before = float(state["seconds_total"])
    last: dict[str, float] = {}
    try:
        n_per_epoch = len(train_batches)  # type: ignore[arg-type]
    except TypeError:
        n_per_epoch = None
    total_steps = n_per_epoch * (epochs - start_epoch) if (n_per_epoch and epochs and budget is None) else None

    def progress() -> float:
        if budget is not None:
            return (time.monotonic() - start) / budget
        done = state["epoch"] - start_epoch
        return done / max(1, epochs - start_epoch)

    def out_of_time() -> bool:
        return budget is not None and time.monotonic() - start >= budget

    with task("training", total=total_steps) as advance:
        while (epochs is None or state["epoch"] < epochs) and not out_of_time():
            _set_epoch(train_batches, state["epoch"], seed)
            model.train()
            losses = []
            epoch_start = time.monotonic()
            for batch in train_batches:
                for group in optimizer.param_groups:
                    group["lr"] = lr * _lr_factor(progress(), state["step"], warmup_steps)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss = step_fn(model, batch, device)
                loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                losses.append(float(loss.detach()))
                state["step"] += 1
                advance(1)
                if out_of_time():
                    break
            if val_batches is not None:
                _set_epoch(val_batches, 0, seed)  # validation is the same every epoch
            last = _evaluate(model, val_batches, val_fn, device) if val_fn else {}
            state["epoch"] += 1
            train_loss = float(np.mean(losses)) if losses else float("nan")
            score = last.get(monitor, train_loss)
            improved = _better(score, state["best"], mode)
            if improved:
                state["best"], state["best_epoch"] = score, state["epoch"]
                bundle_meta = dict(meta or {}, epoch=state["epoch"], steps=state["step"],
                                   train_loss=train_loss, val=last, monitor=monitor,
                                   seconds=round(seconds_before + time.monotonic() - start, 1),
                                   device=device.type, seed=seed)
                save_bundle(out, arch, config, model.state_dict(), bundle_meta)
            state["seconds_total"] = seconds_before + time.monotonic() - start
            _save_checkpoint(ckpt, model, optimizer, state)
            record = {"epoch": state["epoch"], "step": state["step"], "train_loss": train_loss,
                      **{f"val_{k}": v for k, v in last.items()},
                      "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.monotonic() - start, 2),
                      "epoch_seconds": round(time.monotonic() - epoch_start, 2), "best": improved}
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(_plain(record)) + "\n")
            vals = " ".join(f"val_{k} {v:.4g}" for k, v in last.items())
            info(f"epoch {state['epoch']}: train_loss {train_loss:.4g} {vals}{' *' if improved else ''}")
    if state["best"] is None:
        raise DataError("training produced no finite score; no weights were written", out)
    summary = {"epochs": state["epoch"], "steps": state["step"], "best": state["best"],
               "best_epoch": state["best_epoch"], "seconds": round(time.monotonic() - start, 1),
               "out": str(out), "log": str(log), "checkpoint": str(ckpt), "last": last}
    debug(f"training summary: {summary}")
    return summary


def _save_checkpoint(path: Path, model, optimizer, state: dict) -> None:
    import torch

    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": _plain(state),
               "torch_rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
