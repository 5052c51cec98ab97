"""Level-dependent dimensions of the human spine (millimetres, degrees).

Values are rounded means of adult cadaver and CT series; each case scales them by a
body-size factor and jitters every vertebra, so the tables only set the centre of the
distribution. Sources:

* Panjabi MM, Duranceau J, Goel V, Oxland T, Takata K. Cervical human vertebrae:
  quantitative three-dimensional anatomy of the middle and lower regions.
  Spine 1991;16(8):861-869.  (C3-C7 endplate width/depth, pedicles, canal)
* Panjabi MM, Takata K, Goel V, et al. Thoracic human vertebrae: quantitative
  three-dimensional anatomy. Spine 1991;16(8):888-901.  (T1-T12)
* Panjabi MM, Goel V, Oxland T, et al. Human lumbar vertebrae: quantitative
  three-dimensional anatomy. Spine 1992;17(3):299-306.  (L1-L5)
* Zhou SH, McCarthy ID, McGregor AH, Coombs RRH, Hughes SPF. Geometrical dimensions
  of the lower lumbar vertebrae - analysis of data from digitised CT images.
  Eur Spine J 2000;9:242-248.  (L3-L5 transverse process span, pedicle width)
* Gilad I, Nissan M. A study of vertebra and disc geometric relations of the human
  cervical, thoracic, and lumbar spine. Spine 1986;11(2):154-157.  (disc heights)
* Doherty BJ, Heggeness MH. The quantitative anatomy of the atlas.
  Spine 1994;19(22):2497-2500; and Gosavi SN, Vatsalaswamy P. Morphometric study of
  the axis vertebra. J Anat Soc India 2012;61:9-14.  (C1 ring, C2 body and dens)
* Roussouly P, Gollogly S, Berthonnaud E, Dimnet J. Classification of the normal
  variation in the sagittal alignment of the human lumbar spine and pelvis in the
  standing position. Spine 2005;30(3):346-353.  (sacral slope, lordosis, incidence)
* Bernhardt M, Bridwell KH. Segmental analysis of the sagittal plane alignment of
  the normal thoracic and lumbar spines and thoracolumbar junction.
  Spine 1989;14(7):717-721.  (kyphosis 20-50 deg, segmental angles)
* Mohr M, Abrams E, Engel C, Long WB, Bottlang M. Geometry of human ribs pertinent to
  orthopedic chest-wall reconstruction. J Biomech 2007;40(6):1310-1317.  (rib arc
  lengths ~13 cm for rib 1, 25-30 cm for ribs 5-8, 10-15 cm for rib 12)
* Castellvi AE, Goldstein LA, Chan DP. Lumbosacral transitional vertebrae and their
  relationship with lumbar extradural defects. Spine 1984;9(5):493-495.  (the
  19 mm transverse-process criterion and grades)
* Schreiber JJ, Anderson PA, Rosas HG, Buchholz AL, Au AG. Hounsfield units for
  assessing bone mineral density and strength. J Bone Joint Surg Am 2011;93:1057-1063.
  (trabecular HU of 100-300 in adults)
"""

from __future__ import annotations

import numpy as np

# Columns: body width W, depth D, height H, pedicle width pw, pedicle height ph,
# pedicle length pl, canal width cw, canal depth cd, transverse half-span tp (midline to
# tip), spinous length sl (lamina junction to tip), spinous angle sa (deg below
# horizontal), spinous height sh, disc height below the vertebra (disc),
# pedicle convergence conv (deg, posterior end lateral).
FIELDS = ("W", "D", "H", "pw", "ph", "pl", "cw", "cd", "tp", "sl", "sa", "sh", "disc", "conv")
_ANCHORS = {
    # position on a continuous C1=1 ... L5=24 scale
    3: (15.5, 15.5, 14.0, 5.5, 7.0, 6.0, 24.0, 15.0, 26.0, 20.0, 20.0, 8.0, 5.0, 45.0),
    7: (19.0, 16.5, 15.0, 6.5, 7.5, 7.0, 23.0, 15.0, 37.0, 36.0, 30.0, 10.0, 5.5, 35.0),
    8: (25.0, 17.0, 15.0, 8.0, 10.0, 9.0, 21.0, 15.0, 38.0, 40.0, 35.0, 10.0, 4.5, 25.0),
    11: (26.0, 22.0, 17.0, 5.0, 11.0, 10.0, 16.0, 15.0, 35.0, 42.0, 55.0, 10.0, 4.5, 10.0),
    15: (30.0, 27.0, 19.5, 5.5, 12.5, 11.0, 16.0, 16.0, 32.0, 40.0, 60.0, 11.0, 5.5, 5.0),
    19: (38.0, 30.0, 23.0, 8.0, 15.0, 12.0, 21.0, 17.0, 24.0, 33.0, 25.0, 18.0, 7.5, 5.0),
    20: (41.0, 31.0, 25.0, 8.5, 15.0, 12.0, 22.0, 17.0, 34.0, 32.0, 10.0, 24.0, 9.0, 8.0),
    22: (45.0, 33.0, 26.0, 10.0, 14.5, 12.0, 23.0, 16.0, 46.0, 32.0, 5.0, 25.0, 11.0, 15.0),
    24: (50.0, 34.0, 25.0, 15.0, 14.0, 10.0, 25.0, 17.0, 43.0, 28.0, 10.0, 20.0, 11.0, 28.0),
}
_POS = np.array(sorted(_ANCHORS))
_VAL = np.array([_ANCHORS[p] for p in _POS])

#: C2: body width/depth/height, dens length and radius (Gosavi 2012).
C2 = {"W": 17.0, "D": 16.0, "H": 21.0, "dens_len": 15.0, "dens_r": 5.0}
#: C1: outer transverse half-width to the lateral masses, AP half-depth of the ring,
#: arch tube radius, lateral mass radii, transverse half-span (Doherty 1994).
C1 = {"a": 22.0, "b": 22.0, "tube": 4.0, "mass": (8.0, 10.5, 10.0), "tp": 38.0}
#: Sacrum: S1 body and ala span (Zhou 2000; anatomical texts).
SACRUM = {"W": 48.0, "D": 32.0, "H": 28.0, "ala": 52.0, "length": 105.0}

#: Osseous rib length as a fraction of the available thoracic half-perimeter (from
#: the tubercle to the anterior midline), tuned so that arc lengths match Mohr 2007.
RIB_FRACTION = {1: 0.86, 2: 0.80, 3: 0.76, 4: 0.74, 5: 0.72, 6: 0.71, 7: 0.71, 8: 0.70,
                9: 0.66, 10: 0.60, 11: 0.42, 12: 0.26}
#: Half width and half depth of the rib cage (mm) at the level of each rib, adult means
#: (Dansereau & Stokes, J Biomech 1988;21:893-901).
CAGE = {1: (55.0, 38.0), 2: (80.0, 52.0), 3: (98.0, 64.0), 4: (110.0, 74.0), 5: (120.0, 82.0),
        6: (128.0, 88.0), 7: (133.0, 92.0), 8: (136.0, 95.0), 9: (137.0, 96.0), 10: (136.0, 96.0),
        11: (133.0, 94.0), 12: (128.0, 90.0)}


def dims_at(position: float) -> dict[str, float]:
    """Interpolated dimensions at a continuous level position (C1=1 ... L5=24)."""
    pos = float(np.clip(position, _POS[0], 26.0))
    out = {}
    for i, name in enumerate(FIELDS):
        out[name] = float(np.interp(pos, _POS, _VAL[:, i]))
    return out


def position_of(region: str, index: int, count: int) -> float:
    """Continuous position of the ``index``-th (1-based) vertebra of a region with
    ``count`` vertebrae: an 11- or 13-vertebra thoracic spine is stretched onto T1-T12."""
    if region == "C":
        return float(index)
    if region == "T":
        return 8.0 + (index - 1) * 11.0 / max(count - 1, 1)
    if region == "L":
        return 20.0 + (index - 1) * 4.0 / max(count - 1, 1)
    raise ValueError(region)
