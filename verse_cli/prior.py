"""The anatomical sequence prior: globally optimal vertebra labels for a chain of candidates.

A labelling network gives, for every candidate point along the spine, a score per
vertebra label. Read one at a time those scores are noisy: neighbouring levels look
alike, and a scan that shows only a part of the spine has few landmarks. This module
combines them with what anatomy says about the whole chain:

* labels run head to foot without duplicates, in the order of
  :data:`verse_cli.core.labels.ANATOMICAL_ORDER`;
* the distance between neighbouring body centroids depends on the level (about
  15 mm in the neck, 20-28 mm in the thoracic and 33-36 mm in the lumbar spine),
  up to one patient-wide scale factor;
* numbering variants are allowed, each with a prior penalty: 13 thoracic
  vertebrae (``T13``, VerSe id 28), 11 thoracic vertebrae (T11 followed by L1),
  6 lumbar vertebrae (``L6``, id 25) and 4 lumbar vertebrae (L4 followed by the
  sacrum);
* a vertebra that bears a rib of at least 38 mm is thoracic (the VerSe rule), so a
  rib probability per candidate pulls towards thoracic labels or away from them;
* the sacrum (``S1``, id 26) is a chain element too: it follows only the last
  lumbar vertebra, which anchors the lumbar numbering from below;
* a level may be missing between two candidates (not detected), at a penalty, and
  a candidate may be a false detection, at the cost of its own evidence;
* user corrections are hard constraints: a fixed candidate keeps its label.

The labelling is the global optimum over all candidates (Viterbi over the chain of
candidates with skips), and each label's confidence is its posterior marginal
from the forward-backward algorithm on the same model. Variants are reported when
the best chain passes through them.

The model is a hidden Markov chain whose states are labels and whose "time" axis is
the ordered list of candidates. Everything is in log-probabilities.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from .core import labels as L

#: The chain states, head to foot: C1-C7, T1-T12, T13, L1-L6 and the sacrum (S1).
PRIOR_LABELS: tuple[int, ...] = tuple(x for x in L.ANATOMICAL_ORDER if x != 27)
_INDEX = {lab: i for i, lab in enumerate(PRIOR_LABELS)}
THORACIC = frozenset(list(range(8, 20)) + [28])
SACRUM = 26
_VARIANT_NEIGHBOURS = {28: (19, 20), 25: (24, SACRUM)}  # T13 between T12 and L1, L6 between L5 and S1

#: Expected distance in mm from a body centroid to the next one in a normal adult spine,
#: keyed by the upper label (C1 -> C2 is keyed 1). Variant steps reuse their neighbours'.
LEVEL_MM: dict[int, float] = {
    1: 15.0, 2: 18.0, 3: 15.5, 4: 15.5, 5: 15.5, 6: 15.5, 7: 17.0,
    8: 19.0, 9: 20.0, 10: 21.0, 11: 21.5, 12: 22.0, 13: 23.0, 14: 24.0, 15: 25.0, 16: 26.0,
    17: 27.0, 18: 28.0, 19: 30.0, 28: 30.0,
    20: 33.0, 21: 34.0, 22: 35.0, 23: 35.0, 24: 36.0, 25: 36.0,
}


@dataclass
class PriorParams:
    """Weights of the prior, in natural-log units."""

    variant_logp: dict[str, float] = field(default_factory=lambda: {
        "T13": np.log(0.04), "T11": np.log(0.03), "L6": np.log(0.06), "L4": np.log(0.03)})
    miss_logp: float = float(np.log(0.02))  # one level not detected between two candidates
    max_missed: int = 2  # levels that may be missing between two consecutive candidates
    max_skipped: int = 5  # false candidates that may lie between two consecutive used ones
    distance_sigma: float = 0.16  # s.d. of log(observed / expected) neighbour distance
    scales: tuple[float, ...] = (0.7, 0.77, 0.85, 0.92, 1.0, 1.08, 1.17, 1.27)
    scale_sigma: float = 0.2  # s.d. of the log patient scale
    rib_weight: float = 1.5  # weight of log rib probability
    sacrum_weight: float = 1.5  # weight of log sacrum probability
    emission_weight: float = 0.35  # network errors are correlated along the chain: temper them
    level_mm: dict[int, float] = field(default_factory=lambda: dict(LEVEL_MM))
    cap_variant_labels: bool = True  # T13 and L6 label evidence at most that of their normal neighbours
    t13_no_rib_weight: float = 3.0  # extra weight of "no rib" evidence against T13 (a T13 bears a rib)
    l6_end_logp: float = float(np.log(0.1))  # a chain ending at L6: no sacrum below it confirms the count
    # steps across the spine: free up to jump_ratio x the step along S + jump_free_mm, then Gaussian
    jump_ratio: float = 0.6
    jump_free_mm: float = 8.0
    jump_sigma_mm: float = 5.0
    # The step to the sacrum (an S1 candidate, or the sacrum's level seen below the chain) is
    # measured along S only: on a real scan the S1 point marks the top of the tilted sacrum, in
    # front of or behind the body line and closer than a body centroid. A gap between
    # (path length - sacrum_window_mm) and 1.1 x path length is free, log-normal outside
    # (sacrum_gap_sigma); the step may run sacrum_free_mm further across than other steps.
    sacrum_window_mm: float = 28.0
    sacrum_gap_sigma: float = 0.3
    sacrum_free_mm: float = 30.0
    sacrum_no_path_logp: float = float(np.log(1e-4))  # more levels missing than the prior allows
    below_sacrum_logp: float = float(np.log(0.01))  # a chain ending under the sacrum's level


@dataclass
class ChainLabels:
    """The optimal labelling of a chain of candidates.

    ``labels[i]`` is the VerSe id of candidate ``i`` (in the caller's order), or ``None``
    when the candidate is judged a false detection. ``confidence[i]`` is the posterior
    probability of that label (or of being false). ``variants`` lists the numbering
    variants the chain passes through (``"T13"``, ``"T11"``, ``"L6"``, ``"L4"``);
    ``missing`` the labels skipped between used candidates; ``scale`` the patient
    scale factor chosen for the distance model.
    """

    labels: list[int | None]
    confidence: np.ndarray
    variants: list[str]
    missing: list[int]
    scale: float
    log_score: float


# --------------------------------------------------------------------------- the label graph
def _edges(params: PriorParams) -> dict[int, list[tuple[int, float, float, str | None]]]:
    """Direct successors of each label: (next label, log prior, expected mm, variant flag)."""
    mm = params.level_mm
    v = params.variant_logp
    order = [lab for lab in PRIOR_LABELS if lab not in (28, 25)]  # the normal 7/12/5 chain
    edges: dict[int, list] = {lab: [] for lab in PRIOR_LABELS}
    for a, b in itertools.pairwise(order):
        edges[a].append((b, 0.0, mm[a], None))
    edges[18].append((20, v["T11"], mm[18], "T11"))  # T11 -> L1: no T12
    edges[19].append((28, v["T13"], mm[19], "T13"))  # T12 -> T13
    edges[28].append((20, 0.0, mm[28], None))
    edges[23].append((SACRUM, v["L4"], mm[24], "L4"))  # L4 -> S1: no L5
    edges[24].append((25, v["L6"], mm[23], "L6"))  # L5 -> L6
    edges[25].append((SACRUM, 0.0, mm[25], None))
    # L6 only after L5 -> L6 and T13 only after T12 -> T13 (the lists above), nothing else.
    return edges


@dataclass
class _Paths:
    """All short paths between label pairs: log prior, expected mm and variant flags."""

    logp: np.ndarray  # (K, K, P), -inf where no path
    mm: np.ndarray  # (K, K, P)
    flags: list  # flags[a][b][p] -> tuple of flags
    missed: list  # missed[a][b][p] -> tuple of skipped labels


def _paths(params: PriorParams) -> _Paths:
    edges = _edges(params)
    K = len(PRIOR_LABELS)
    found: dict[tuple[int, int], list] = {}

    def walk(start, node, logp, mm, flags, inner, depth):
        for nxt, lp, dist, flag in edges[node]:
            step = (logp + lp, mm + dist, flags + ((flag,) if flag else ()), inner)
            found.setdefault((start, nxt), []).append(step)
            if depth < params.max_missed:
                walk(start, nxt, step[0] + params.miss_logp, step[1], step[2], inner + (nxt,), depth + 1)

    for lab in PRIOR_LABELS:
        walk(lab, lab, 0.0, 0.0, (), (), 0)
    P = max(len(v) for v in found.values())
    logp = np.full((K, K, P), -np.inf)
    mm = np.ones((K, K, P))
    flags = [[[()] * P for _ in range(K)] for _ in range(K)]
    missed = [[[()] * P for _ in range(K)] for _ in range(K)]
    for (a, b), items in found.items():
        ia, ib = _INDEX[a], _INDEX[b]
        for p, (lp, dist, fl, inner) in enumerate(items):
            logp[ia, ib, p] = lp
            mm[ia, ib, p] = dist
            flags[ia][ib][p] = fl
            missed[ia][ib][p] = inner
    return _Paths(logp, mm, flags, missed)


# --------------------------------------------------------------------------- scoring
def rib_log_evidence(rib_prob: np.ndarray) -> np.ndarray:
    """(N, K) log-likelihoods from per-candidate probabilities of bearing a rib >= 38 mm."""
    r = np.clip(np.asarray(rib_prob, dtype=np.float64), 0.02, 0.98)[:, None]
    thoracic = np.array([lab in THORACIC for lab in PRIOR_LABELS])[None, :]
    return np.where(thoracic, np.log(2 * r), np.log(2 * (1 - r)))  # ratio to an undecided 0.5


def last_rib_evidence(positions_mm, ct_rib, upper_levels: int = 4, yes: float = 0.85, no: float = 0.15
                      ) -> np.ndarray:
    """Keep, of per-candidate rib findings on the CT, what marks the end of the rib cage.

    ``ct_rib`` holds a finding per candidate: above 0.5 a rib was found, below 0.5 the
    lateral region was in view and held no rib, 0.5 not in view. Read head to foot,
    the last thoracic vertebra is the lowest candidate with a rib that continues a run
    of ribs (it or the candidate above it also has one). Kept: the ribs of that
    vertebra and the ``upper_levels`` above it (the upper rib cage, the shoulder
    girdle and the first rib are left to the network), and the "no rib" findings below
    it. Findings of a rib further down, after two rib-free candidates below a run of
    at least three (long transverse processes, the pelvis), are dropped. Without a run of ribs, only "no rib" findings
    are kept (a lumbar or a cervical scan). Returns probabilities, 0.5 = no evidence.
    """
    pos = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 3)
    ct = np.asarray(ct_rib, dtype=np.float64).reshape(-1)
    out = np.full(len(ct), 0.5)
    if not len(ct):
        return out
    order = np.argsort(-pos[:, 2], kind="stable")  # head first
    seq = ct[order]
    rib = seq > 0.5
    none = seq < 0.5
    last, run, free = -1, 0, 0
    for j in range(len(seq)):
        if rib[j] and ((j > 0 and rib[j - 1]) or (j + 1 < len(seq) and rib[j + 1])):
            if run >= 3 and free >= 2:
                break  # below the end of a rib cage: not ribs
            run = run + 1 if free < 2 else 1  # one missed rib does not end a run
            last, free = j, 0
        elif none[j] and last >= 0:
            free += 1
    res = np.full(len(seq), 0.5)
    if last < 0:
        res[none] = no
    else:
        lo = max(0, last - upper_levels)
        res[lo:last + 1][rib[lo:last + 1]] = yes
        res[lo:last + 1][none[lo:last + 1]] = 0.5  # a missed rib inside the cage is no evidence
        res[last + 1:][none[last + 1:]] = no
    out[order] = res
    return out


def sacrum_log_evidence(sacrum_prob: np.ndarray) -> np.ndarray:
    """(N, K) log-likelihoods from per-candidate probabilities of being the sacrum (S1)."""
    s = np.clip(np.asarray(sacrum_prob, dtype=np.float64), 0.02, 0.98)[:, None]
    is_s1 = (np.array(PRIOR_LABELS) == SACRUM)[None, :]
    return np.where(is_s1, np.log(2 * s), np.log(2 * (1 - s)))


def _transition(paths: _Paths, dist_mm: float, scale: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(K, K) best log score over paths for one observed distance, and the path index."""
    z = np.log(max(dist_mm, 1e-3) / (paths.mm * scale)) / sigma
    total = paths.logp - 0.5 * z * z
    best = np.argmax(total, axis=2)
    return np.take_along_axis(total, best[..., None], axis=2)[..., 0], best


def _transition_sum(paths: _Paths, dist_mm: float, scale: float, sigma: float) -> np.ndarray:
    z = np.log(max(dist_mm, 1e-3) / (paths.mm * scale)) / sigma
    return _logsumexp(paths.logp - 0.5 * z * z, axis=2)


def _logsumexp(a: np.ndarray, axis) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


# --------------------------------------------------------------------------- public API
def label_chain(
    positions_mm,
    label_logp,
    *,
    exist_logp=None,
    rib_prob=None,
    sacrum_prob=None,
    fixed: dict[int, int] | None = None,
    params: PriorParams | None = None,
    sacrum_level: float | None = None,
) -> ChainLabels:
    """Label a chain of candidate vertebrae with the globally best anatomical sequence.

    Parameters
    ----------
    positions_mm : (N, 3) array
        Candidate body centroids in world millimetres (any order; they are sorted
        head to foot by their superior coordinate).
    label_logp : (N, K) array
        Log-likelihood of each label in :data:`PRIOR_LABELS` for each candidate (e.g.
        log of normalised network heatmap values). Use zeros for "no opinion".
    exist_logp : (N,) or (N, 2) array, optional
        Log-probability that each candidate is a real vertebra: ``(N,)`` holds
        ``log p``; its complement is the cost of declaring it false. Default: all
        candidates are real with probability 0.9.
    rib_prob : (N,) array, optional
        Probability that each candidate bears a rib of at least 38 mm (thoracic).
    sacrum_prob : (N,) array, optional
        Probability that each candidate is the top of the sacrum (S1).
    fixed : dict, optional
        ``{candidate index: VerSe id}`` hard constraints (user corrections).
    params : PriorParams, optional
    sacrum_level : float, optional
        World S coordinate (mm) of the sacrum's level where it is seen below the
        candidates (not as a candidate): the chain's last vertebra is numbered from it
        (the last mobile vertebra above the sacrum is L5, unless the gap holds a missed
        level or the chain has evidence for a variant). See :func:`_end_logp`.

    Returns
    -------
    ChainLabels
    """
    params = params or PriorParams()
    pos = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 3)
    N, K = len(pos), len(PRIOR_LABELS)
    # Every evidence term is a likelihood ratio against "no information", so that a used
    # candidate and a candidate declared false are scored on the same footing.
    logp = np.asarray(label_logp, dtype=np.float64).reshape(N, K)
    if N:
        logp = logp - _logsumexp(logp, axis=1)[:, None] + np.log(K)
    if params.cap_variant_labels and N:
        # The network cannot count: a variant label only wins through the anchors (ribs,
        # the sacrum, a chain that reaches C1), never on its own channel. Its label
        # evidence is at most that of the normal neighbours it replaces.
        for var, nbrs in _VARIANT_NEIGHBOURS.items():
            cap = logp[:, [_INDEX[b] for b in nbrs]].max(axis=1)
            logp[:, _INDEX[var]] = np.minimum(logp[:, _INDEX[var]], cap)
    emis = logp * params.emission_weight
    if rib_prob is not None:
        emis = emis + params.rib_weight * rib_log_evidence(rib_prob)
        # T13 is defined by its rib: evidence against a rib counts extra there
        r = np.clip(np.asarray(rib_prob, dtype=np.float64), 0.02, 0.98)
        emis[:, _INDEX[28]] += params.t13_no_rib_weight * np.minimum(0.0, np.log(2 * r))
    if sacrum_prob is not None:
        emis = emis + params.sacrum_weight * sacrum_log_evidence(sacrum_prob)
    p_real = np.full(N, 0.9) if exist_logp is None else np.exp(np.asarray(exist_logp, dtype=np.float64))
    p_real = np.clip(p_real, 1e-6, 1 - 1e-6)
    use, skip = np.log(p_real), np.log1p(-p_real)
    if sacrum_prob is not None:  # a false detection is not the sacrum either
        skip = skip + params.sacrum_weight * np.log(
            2 * (1 - np.clip(np.asarray(sacrum_prob, dtype=np.float64), 0.02, 0.98)))
    fixed = dict(fixed or {})
    for i, lab in fixed.items():
        if int(lab) not in _INDEX:
            raise ValueError(f"label {lab} cannot be fixed in the chain")
        row = np.full(K, -np.inf)
        row[_INDEX[int(lab)]] = 0.0
        emis[i] = row
        use[i], skip[i] = 0.0, -np.inf
    if N == 0:
        return ChainLabels([], np.zeros(0), [], [], 1.0, 0.0)

    order = np.argsort(-pos[:, 2], kind="stable")  # world S: head first
    pos, emis, use, skip = pos[order], emis[order], use[order], skip[order]
    paths = _paths(params)
    best = None
    for scale in params.scales:
        scale_logp = -0.5 * (np.log(scale) / params.scale_sigma) ** 2
        end_logp = _end_logp(params, pos, paths, scale, sacrum_level)
        score, chosen = _viterbi(pos, emis, use, skip, paths, scale, params, end_logp)
        if best is None or score + scale_logp > best[0]:
            best = (score + scale_logp, scale, chosen)
    assert best is not None
    total, scale, chosen = best
    post = _posteriors(pos, emis, use, skip, paths, scale, params,
                       _end_logp(params, pos, paths, scale, sacrum_level))

    labels_sorted: list[int | None] = [None] * N
    conf_sorted = np.zeros(N)
    for i in range(N):
        conf_sorted[i] = np.exp(post[i, K])  # probability of being false
    for i, k in chosen:
        labels_sorted[i] = PRIOR_LABELS[k]
        conf_sorted[i] = float(np.exp(post[i, k]))
    variants, missing = _path_details(pos, chosen, paths, scale, params)

    labels_out: list[int | None] = [None] * N
    conf_out = np.zeros(N)
    for rank_i, src in enumerate(order):
        labels_out[src] = labels_sorted[rank_i]
        conf_out[src] = conf_sorted[rank_i]
    return ChainLabels(labels_out, np.clip(conf_out, 0.0, 1.0), variants, missing, float(scale), float(total))


# --------------------------------------------------------------------------- dynamic programming
class _SkipSums:
    """Sums of the "false candidate" scores over index ranges; fixed candidates can't be false."""

    def __init__(self, skip: np.ndarray):
        finite = np.where(np.isfinite(skip), skip, 0.0)
        self.total = np.concatenate([[0.0], np.cumsum(finite)])
        self.fixed = np.concatenate([[0], np.cumsum(~np.isfinite(skip))])

    def range(self, a: int, b: int) -> float:
        """Score of declaring candidates a..b-1 false."""
        if b <= a:
            return 0.0
        if self.fixed[b] - self.fixed[a] > 0:
            return -np.inf
        return float(self.total[b] - self.total[a])

    def before(self, j: int) -> float:
        return self.range(0, j)

    def after(self, i: int, n: int) -> float:
        return self.range(i + 1, n)


def _jump_logp(a: np.ndarray, b: np.ndarray, params) -> float:
    """Log penalty for a step between consecutive used candidates that runs more across
    (left-right, anterior-posterior) than the spine can bend: a peak on the posterior
    elements or in front of the spine is no next vertebra."""
    dz = abs(float(b[2] - a[2]))
    dxy = float(np.hypot(b[0] - a[0], b[1] - a[1]))
    excess = dxy - (params.jump_ratio * dz + params.jump_free_mm)
    if excess <= 0:
        return 0.0
    return -0.5 * (excess / params.jump_sigma_mm) ** 2


def _sacrum_step(paths: _Paths, gap_mm, scale: float, params) -> np.ndarray:
    """(..., K, P) log score of the paths from each label to S1 for gaps along S (``gap_mm``: any shape)."""
    s = _INDEX[SACRUM]
    mm = paths.mm[:, s, :] * scale  # (K, P)
    lo = np.maximum(mm - params.sacrum_window_mm * scale, 4.0)
    hi = 1.1 * mm
    g = np.maximum(np.asarray(gap_mm, dtype=np.float64), 1.0)[..., None, None]
    z = (np.log(np.minimum(g / lo, 1.0)) + np.log(np.maximum(g / hi, 1.0))) / params.sacrum_gap_sigma
    return paths.logp[:, s, :] - 0.5 * z * z


def _sacrum_jump(a: np.ndarray, b: np.ndarray, params) -> float:
    """The step to the sacrum may run further across (see :class:`PriorParams`)."""
    dz = abs(float(b[2] - a[2]))
    dxy = float(np.hypot(b[0] - a[0], b[1] - a[1]))
    excess = dxy - (params.jump_ratio * dz + params.jump_free_mm + params.sacrum_free_mm)
    return 0.0 if excess <= 0 else -0.5 * (excess / params.jump_sigma_mm) ** 2


def _end_logp(params, pos: np.ndarray, paths: _Paths, scale: float, sacrum_level: float | None
              ) -> np.ndarray:
    """(N, K) log prior of the chain ending at candidate i with label k.

    Without a sacrum level: L6 needs the sacrum after it (``l6_end_logp``). With one (the
    sacrum seen below the chain): the gap along S from the last vertebra to that level
    must fit the levels between them, over the same paths as between candidates
    (missed levels and variants at their prior cost); a last vertebra below the level
    pays ``below_sacrum_logp``; S1 itself ends the chain freely.
    """
    N, K = len(pos), len(PRIOR_LABELS)
    out = np.zeros((N, K))
    if sacrum_level is None:
        out[:, _INDEX[25]] = params.l6_end_logp
        return out
    s = _INDEX[SACRUM]
    gap = pos[:, 2] - float(sacrum_level)  # (N,)
    fit = np.max(_sacrum_step(paths, gap, scale, params), axis=2)  # (N, K)
    fit = np.maximum(fit, params.sacrum_no_path_logp)
    out = np.where(gap[:, None] > 0, fit, params.below_sacrum_logp)
    out[:, s] = 0.0
    return out


def _viterbi(pos, emis, use, skip, paths, scale, params, end_logp):
    N, K = emis.shape
    s1 = _INDEX[SACRUM]
    sums = _SkipSums(skip)
    unary = emis + use[:, None]
    V = np.full((N, K), -np.inf)
    back: list[list] = [[None] * K for _ in range(N)]
    window = params.max_skipped + 1
    for j in range(N):
        V[j] = sums.before(j) + unary[j]  # start here, every earlier candidate false
        for i in range(max(0, j - window), j):
            gap = sums.range(i + 1, j)
            if not np.isfinite(gap):
                continue
            T, _ = _transition(paths, float(np.linalg.norm(pos[j] - pos[i])), scale, params.distance_sigma)
            T = T + _jump_logp(pos[i], pos[j], params)
            T[:, s1] = (np.max(_sacrum_step(paths, pos[i, 2] - pos[j, 2], scale, params), axis=-1)
                        + _sacrum_jump(pos[i], pos[j], params))
            cand = V[i][:, None] + T + gap  # (K from, K to)
            arg = np.argmax(cand, axis=0)
            val = cand[arg, np.arange(K)] + unary[j]
            better = val > V[j]
            V[j] = np.where(better, val, V[j])
            for k in np.nonzero(better)[0]:
                back[j][k] = (i, int(arg[k]))
    end = V + np.array([sums.after(i, N) for i in range(N)])[:, None] + end_logp  # every later candidate false
    if not np.isfinite(end).any():
        raise ValueError("no labelling satisfies the constraints")
    j, k = np.unravel_index(int(np.argmax(end)), end.shape)
    score = float(end[j, k])
    chosen = []
    node = (int(j), int(k))
    while node is not None:
        chosen.append(node)
        node = back[node[0]][node[1]]
    return score, chosen[::-1]


def _posteriors(pos, emis, use, skip, paths, scale, params, end_logp) -> np.ndarray:
    """(N, K + 1) log posterior of each label per candidate; column K: candidate false."""
    N, K = emis.shape
    s1 = _INDEX[SACRUM]
    sums = _SkipSums(skip)
    unary = emis + use[:, None]
    window = params.max_skipped + 1
    ends = np.array([sums.after(i, N) for i in range(N)])
    trans = {}
    for j in range(N):
        for i in range(max(0, j - window), j):
            t = (_transition_sum(paths, float(np.linalg.norm(pos[j] - pos[i])), scale, params.distance_sigma)
                 + _jump_logp(pos[i], pos[j], params))
            t[:, s1] = (_logsumexp(_sacrum_step(paths, pos[i, 2] - pos[j, 2], scale, params), axis=-1)
                        + _sacrum_jump(pos[i], pos[j], params))
            trans[i, j] = t + sums.range(i + 1, j)
    alpha = np.full((N, K), -np.inf)
    for j in range(N):
        terms = [sums.before(j) + unary[j]]
        for i in range(max(0, j - window), j):
            terms.append(_logsumexp(alpha[i][:, None] + trans[i, j], axis=0) + unary[j])
        alpha[j] = _logsumexp(np.stack(terms), axis=0)
    beta = np.full((N, K), -np.inf)
    for i in range(N - 1, -1, -1):
        terms = [ends[i] + end_logp[i]]
        for j in range(i + 1, min(N, i + window + 1)):
            terms.append(_logsumexp(trans[i, j] + (unary[j] + beta[j])[None, :], axis=1))
        beta[i] = _logsumexp(np.stack(terms), axis=0)
    logz = float(_logsumexp((alpha + ends[:, None] + end_logp).ravel(), axis=0))
    post = np.full((N, K + 1), -np.inf)
    post[:, :K] = alpha + beta - logz
    used = _logsumexp(post[:, :K], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        post[:, K] = np.log(np.clip(1.0 - np.exp(used), 0.0, 1.0))
    return post


def _path_details(pos, chosen, paths, scale, params):
    variants: list[str] = []
    missing: list[int] = []
    for (i, a), (j, b) in itertools.pairwise(chosen):
        if b == _INDEX[SACRUM]:
            p = int(np.argmax(_sacrum_step(paths, pos[i, 2] - pos[j, 2], scale, params)[a]))
        else:
            _, arg = _transition(paths, float(np.linalg.norm(pos[j] - pos[i])), scale, params.distance_sigma)
            p = int(arg[a, b])
        variants.extend(paths.flags[a][b][p])
        missing.extend(paths.missed[a][b][p])
    labs = {PRIOR_LABELS[k] for _, k in chosen}
    if 28 in labs and "T13" not in variants:
        variants.append("T13")
    if 25 in labs and "L6" not in variants:
        variants.append("L6")
    return sorted(set(variants), key=["T11", "T13", "L4", "L6"].index), missing


def variant_flags(labels) -> list[str]:
    """Variant flags implied by a final set of labels alone (T13 and L6 are visible as ids)."""
    labs = {int(x) for x in labels}
    return [f for f, lab in (("T13", 28), ("L6", 25)) if lab in labs]
