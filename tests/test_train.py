"""The shared training framework: discovery, splits, bundles, the fit loop and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from verse_cli.core.errors import DataError, UsageError
from verse_cli.nets.train import (
    checkpoint_path,
    discover_cases,
    fit,
    load_bundle,
    log_path,
    make_loader,
    model_hash,
    pick_device,
    save_bundle,
    split_cases,
)


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_discover_verse_layout(tmp_path):
    ct = _touch(tmp_path / "rawdata/sub-a01/sub-a01_ct.nii.gz")
    _touch(tmp_path / "rawdata/sub-a01/sub-a01_desc-defaced_ct.nii.gz")
    msk = _touch(tmp_path / "derivatives/sub-a01/sub-a01_seg-vert_msk.nii.gz")
    ctd = _touch(tmp_path / "derivatives/sub-a01/sub-a01_seg-subreg_ctd.json")
    _touch(tmp_path / "derivatives/sub-a01/sub-a01_seg-vb_ctd.json")
    _touch(tmp_path / "rawdata/sub-b02/sub-b02_dir-ax_ct.nii.gz")
    m2 = _touch(tmp_path / "derivatives/sub-b02/sub-b02_dir-ax_seg-vert_msk.nii.gz")
    _touch(tmp_path / "derivatives/sub-c03/sub-c03_seg-vert_msk.nii.gz")  # no CT: not a case
    cases = discover_cases(tmp_path)
    assert [c.subject for c in cases] == ["a01", "b02_dir-ax"]
    assert (cases[0].ct, cases[0].mask, cases[0].ctd, cases[0].variants) == (ct, msk, ctd, None)
    assert cases[1].mask == m2 and cases[1].ctd is None


def test_discover_flat_and_errors(tmp_path):
    _touch(tmp_path / "sub-syn0001_ct.nii.gz")
    v = _touch(tmp_path / "sub-syn0001_variants.json")
    _touch(tmp_path / "notes.txt")
    (case,) = discover_cases(tmp_path)
    assert case.subject == "syn0001" and case.variants == v and case.mask is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CT found"):
        discover_cases(tmp_path / "empty")
    with pytest.raises(DataError, match="no such dataset folder"):
        discover_cases(tmp_path / "missing")


def test_split_is_seeded_and_disjoint():
    cases = list(range(20))
    train, val = split_cases(cases, 0.2, seed=3)
    assert len(val) == 4 and sorted(train + val) == cases
    assert split_cases(cases, 0.2, seed=3) == (train, val)
    assert split_cases(cases, 0.2, seed=4) != (train, val)
    assert split_cases([1], 0.5) == ([1], [])
    assert split_cases([1, 2], 0.01)[1] != []


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError):
        pick_device("tpu")


def test_bundle_roundtrip_and_hash(tmp_path):
    path = tmp_path / "m.pt"
    sd = {"w": torch.arange(4.0)}
    save_bundle(path, "Toy", {"n": 4}, sd, {"score": np.float32(0.5)})
    arch, config, state, meta = load_bundle(path)
    assert (arch, config, meta) == ("Toy", {"n": 4}, {"score": 0.5})
    assert torch.equal(state["w"], sd["w"])
    h = model_hash(path)
    assert len(h) == 12 and int(h, 16) >= 0
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a bundle")
    with pytest.raises(DataError, match="bad.pt"):
        load_bundle(bad)
    with pytest.raises(DataError, match="no such model file"):
        load_bundle(tmp_path / "absent.pt")


class _Toy(torch.nn.Module):
    arch = "Toy"

    def __init__(self):
        super().__init__()
        self.config = {"n": 3}
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
        self.epochs_seen = []

    def set_epoch(self, epoch):
        self.epochs_seen.append(epoch)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _step(model, batch, device):
    x, y = (t.to(device) for t in batch)
    return torch.nn.functional.mse_loss(model(x), y)


def _val(model, batch, device):
    return {"loss": float(_step(model, batch, device)), "other": 1.0}


def test_fit_trains_saves_best_logs_and_resumes(tmp_path):
    out = tmp_path / "toy.pt"
    data = _Data()
    train = make_loader(data, batch_size=8, seed=1)
    val = make_loader(_Data(8), batch_size=8, shuffle=False)
    summary = fit(_Toy(), train, val, _step, _val, out=out, epochs=3, lr=0.05, seed=1, warmup_steps=1)
    assert summary["epochs"] == 3 and summary["steps"] == 12
    assert data.epochs_seen == [0, 1, 2]
    records = [json.loads(line) for line in log_path(out).read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    arch, config, _, meta = load_bundle(out)
    assert arch == "Toy" and config == {"n": 3} and meta["epoch"] == summary["best_epoch"]
    assert checkpoint_path(out).is_file()

    resumed = fit(_Toy(), train, val, _step, _val, out=out, epochs=5, lr=0.05, seed=1, resume=True)
    assert resumed["epochs"] == 5 and resumed["steps"] == 20
    records = [json.loads(line) for line in log_path(out).read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]


def test_fit_respects_minutes_and_needs_a_budget(tmp_path):
    out = tmp_path / "t.pt"
    loader = make_loader(_Data(), batch_size=4)
    summary = fit(_Toy(), loader, None, _step, None, out=out, minutes=0.02, seed=0)
    assert summary["seconds"] < 1.2 + 1.0 and summary["epochs"] >= 1 and out.is_file()
    with pytest.raises(UsageError):
        fit(_Toy(), loader, None, _step, None, out=out)


def test_fit_same_seed_same_weights(tmp_path):
    def run(name):
        torch.manual_seed(2)  # the caller seeds before building the model
        fit(_Toy(), make_loader(_Data(), batch_size=8, seed=2), None, _step, None,
            out=tmp_path / name, epochs=2, seed=2)
        return load_bundle(tmp_path / name)[2]

    a, b = run("a.pt"), run("b.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
