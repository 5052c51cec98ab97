"""The head above the cervical spine: cranial vault, skull base, brain and the face's cavities.

Everything is laid out in C1's frame (x right, y anterior, z cranial; mm), so the head
follows the neck's lordosis and tilt. Dimensions are adult means scaled by the case's
``size``: cranial length about 180 mm, breadth 140 mm and basion-bregma height 135 mm
(Howells WW, Cranial variation in man, 1973); vault 5-7 mm thick, two compact tables around
the diploe; foramen magnum about 35 x 30 mm. The neighbourhood of C1 is not scaled, since
the vertebrae are not.

A single ellipsoidal shell had a sphere sitting on the atlas, with its lower half curving
down through the face and around the neck: no floor, no clivus, no air in the face.
Here the vault is cut by a skull base (flat posterior fossa around the foramen magnum, the
clivus rising forward to the sella, the anterior fossa above the nose), with the dense
petrous ridges, air cells in the mastoids and the sphenoid, occipital condyles over the
atlas (a joint space apart), and in the face the nasal cavity, maxillary sinuses, hard
palate and orbits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import Level, world_box
from .engine import Shape, capsule, ellipsoid, smax, smin

F32 = np.float32

#: Skull-base floor in C1's sagittal plane, (y, z) mm: the occipital squama rising back to the
#: inion, opisthion, basion, clivus up to the dorsum sellae, anterior fossa. The cranial cavity
#: lies above it; bone fills ``_BASE_MM`` below it (the fossae's floors are thin, 1-4 mm; the
#: clivus, a thick bar, is added apart).
_FLOOR = ((-120.0, 64.0), (-70.0, 36.0), (-26.0, 20.0), (6.0, 22.0), (34.0, 48.0), (120.0, 54.0))
_BASE_MM = 3.0
#: Vault thickness (mm): outer table, diploe, inner table.
_VAULT_MM = 6.5
#: Joint space between an occipital condyle and the atlas's lateral mass (mm): real ones are
#: 1.5-2 mm; the atlas's random deformation (about 1 mm) must not close it.
_CONDYLE_GAP = 3.0


@dataclass
class Head:
    """The head of one case, in the frame of ``c1``."""

    c1: Level
    size: float

    @property
    def vault_centre(self) -> np.ndarray:
        s = self.size
        return np.array([0.0, 20.0 * s, 24.0 + 40.0 * s], F32)

    @property
    def vault_radii(self) -> np.ndarray:
        s = self.size
        return np.array([70.0 * s, 90.0 * s, 76.0 * s], F32)

    def box(self, lo, hi, margin: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
        """World bounds of a local box."""
        return world_box(self.c1, np.asarray(lo), np.asarray(hi), margin)

    def vault_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The vault's box in C1's frame."""
        c, r = self.vault_centre, self.vault_radii
        return c - r, c + r

    def shape(self, local_sdf, lo, hi, **kw) -> Shape:
        """A shape whose SDF is written in C1's frame, bounded by the local box ``lo``-``hi``."""
        c1 = self.c1
        blo, bhi = self.box(lo, hi)
        return Shape(sdf=lambda p: local_sdf(c1.local(p)), lo=blo, hi=bhi, **kw)

    def floor_z(self, y: np.ndarray) -> np.ndarray:
        """Height of the skull-base floor at ``y`` (C1's sagittal plane; anterior part scaled)."""
        ys, zs = (np.array(v) for v in zip(*_FLOOR))
        scale = np.where(ys > 6.0, self.size, 1.0)
        return np.interp(y, ys * scale, zs * scale).astype(F32)

    def cavity(self, q: np.ndarray) -> np.ndarray:
        """The cranial cavity: inside the vault's inner table and above the base."""
        inner = ellipsoid(q, self.vault_centre, self.vault_radii - _VAULT_MM)
        return smax(inner, self.floor_z(q[:, 1]) - q[:, 2], 3.0)

    def skull(self, q: np.ndarray) -> np.ndarray:
        """Vault and base: the outer ellipsoid less the cavity, down to ``_BASE_MM`` under
        the floor, with the foramen magnum open over the dens."""
        outer = ellipsoid(q, self.vault_centre, self.vault_radii)
        d = smax(outer, -self.cavity(q), 1.0)
        d = smax(d, self.floor_z(q[:, 1]) - _BASE_MM - q[:, 2], 1.5)
        fm = capsule(q, (0.0, -10.0, 0.0), (0.0, -10.0, 60.0), 16.0, scale=(1.0, 0.9, 1.0))
        return smax(d, -fm, 2.0)


def skull_shapes(c1: Level, size: float, bone, mandible: Shape | None = None) -> list[Shape]:
    """Bone of the head (painted over the soft tissue), then the air inside it."""
    h = Head(c1, size)
    s = size
    vlo, vhi = h.vault_bounds()
    out = [h.shape(h.skull, vlo, vhi, material=bone.material(cortex_mm=1.6), core_depth=None)]
    # occipital condyles over the lateral masses of the atlas (as placed by ``atlas_sdf``)
    g = c1.dims
    zc = g["mass"][2] + _CONDYLE_GAP + 4.0
    for x in (g["a"] - 3.0, 3.0 - g["a"]):
        out.append(h.shape(lambda q, x=x: smin(ellipsoid(q, (x, -6.0, zc), (7.0, 10.0, 4.0)),
                                               capsule(q, (x, -6.0, zc), (x * 0.8, -6.0, 24.0), 5.0), 2.0),
                           (x - 9, -18, zc - 6), (x + 9, 6, 28), material=bone.material(cortex_mm=1.5),
                           core_depth=None))
    # the clivus: a bar about 12 mm thick from the basion up to the dorsum sellae
    a, b = (0.0, 12.0, 14.0), (0.0, 30.0 * s, 42.0 * s)
    out.append(h.shape(lambda q: capsule(q, a, b, 6.0, scale=(0.6, 1.0, 1.0)), np.minimum(a, b) - 11,
                       np.maximum(a, b) + 11, material=bone.material(cortex_mm=1.5), core_depth=None))
    # petrous ridges: the densest bone of the body, running back and out from the clivus
    for x in (1.0, -1.0):
        a, b = (x * 14.0, 18.0, 28.0), (x * 48.0 * s, -8.0, 26.0)
        out.append(h.shape(lambda q, a=a, b=b: capsule(q, a, b, 7.0, scale=(1.0, 1.0, 1.3)),
                           np.minimum(a, b) - 9, np.maximum(a, b) + 9,
                           material=bone.material(cortex_mm=4.0, trab=bone.cortex * 0.8), core_depth=None))
    # sphenoid body under the sella, mastoids behind the ears: bone around air cells
    cells = [((0.0, 40.0 * s, 32.0), (15.0, 14.0, 14.0), (10.0, 10.0, 9.0)),
             ((54.0 * s, -14.0, 16.0), (8.0, 10.0, 11.0), (5.5, 7.0, 8.0)),
             ((-54.0 * s, -14.0, 16.0), (8.0, 10.0, 11.0), (5.5, 7.0, 8.0))]
    for c, r, _air in cells:
        out.append(h.shape(lambda q, c=c, r=r: ellipsoid(q, c, r), np.subtract(c, r), np.add(c, r),
                           material=bone.material(cortex_mm=1.5), core_depth=None))
    for c, _r, air in cells:
        out.append(h.shape(lambda q, c=c, air=air: ellipsoid(q, c, air), np.subtract(c, air), np.add(c, air),
                           value=-850.0))
    # hard palate and the bony walls of the maxillary sinuses
    out.append(h.shape(lambda q: ellipsoid(q, (0.0, 80.0 * s, -6.0), (20.0 * s, 28.0 * s, 3.0)),
                       (-22 * s, 50 * s, -10), (22 * s, 110 * s, -2), material=bone.material(cortex_mm=1.5),
                       core_depth=None))
    for x in (24.0 * s, -24.0 * s):
        c, r = (x, 76.0 * s, 10.0), (12.5 * s, 15.5 * s, 16.5 * s)
        out.append(h.shape(lambda q, c=c, r=r: np.abs(ellipsoid(q, c, r)) - F32(1.0),
                           np.subtract(c, r) - 2, np.add(c, r) + 2, material=bone.material(cortex_mm=1.0),
                           core_depth=None))
    if mandible is not None:
        out.append(mandible)
    return out


def soft_shapes(c1: Level, size: float, hu: dict) -> list[Shape]:
    """Scalp and face, cerebrospinal fluid, grey and white matter with the lateral ventricles,
    and the air of the nose, the maxillary sinuses and the orbits' fat around the eyes."""
    h = Head(c1, size)
    s = size
    vlo, vhi = h.vault_bounds()
    scalp = h.vault_radii + 5.0
    out = [h.shape(lambda q: ellipsoid(q, h.vault_centre, scalp), h.vault_centre - scalp,
                   h.vault_centre + scalp, value=hu["muscle"])]
    fc, fr = (0.0, 70.0 * s, 25.0 * s), (55.0 * s, 40.0 * s, 65.0 * s)
    out.append(h.shape(lambda q: ellipsoid(q, fc, fr), np.subtract(fc, fr), np.add(fc, fr),
                       value=hu["muscle"] - 10))
    out.append(h.shape(h.cavity, vlo, vhi, value=hu["csf"]))
    brain = hu["brain"]
    out.append(h.shape(lambda q: h.cavity(q) + F32(1.5), vlo, vhi, value=brain + 4.0))
    wc, wr = h.vault_centre + np.array([0.0, 0.0, 10.0 * s], F32), h.vault_radii * np.array([0.6, 0.62, 0.45], F32)
    out.append(h.shape(lambda q: smax(ellipsoid(q, wc, wr), h.floor_z(q[:, 1]) + 14.0 - q[:, 2], 4.0),
                       wc - wr, wc + wr, value=brain - 6.0))
    for x in (7.0 * s, -7.0 * s):
        c = (x, 20.0 * s, 75.0 * s)
        out.append(h.shape(lambda q, c=c: capsule(q, np.add(c, (0, 20 * s, -4)), np.add(c, (0, -22 * s, 0)), 3.5 * s,
                                                  scale=(1.6, 1.0, 1.0)),
                           np.subtract(c, (10, 30, 10)), np.add(c, (10, 30, 10)), value=hu["csf"]))
    # the orbits' fat around the globes, below the anterior fossa
    for x in (32.0 * s, -32.0 * s):
        c = (x, 88.0 * s, 40.0 * s)
        out.append(h.shape(lambda q, c=c: ellipsoid(q, c, (16.0 * s, 18.0 * s, 15.0 * s)),
                           np.subtract(c, 19 * s), np.add(c, 19 * s), value=-90.0))
        g = np.add(c, (0.0, 6.0 * s, 0.0))
        out.append(h.shape(lambda q, g=g: ellipsoid(q, g, (12.0 * s, 12.0 * s, 12.0 * s)),
                           g - 13 * s, g + 13 * s, value=12.0))
    # nose and maxillary sinuses: air
    air = [((0.0, 82.0 * s, 16.0), (9.0 * s, 26.0 * s, 20.0 * s))]
    air += [((x, 76.0 * s, 10.0), (11.5 * s, 14.5 * s, 15.5 * s)) for x in (24.0 * s, -24.0 * s)]
    for c, r in air:
        out.append(h.shape(lambda q, c=c, r=r: ellipsoid(q, c, r), np.subtract(c, r), np.add(c, r), value=-950.0))
    return out
