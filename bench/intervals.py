"""The evaluation's interval (``dala_search.intervals``): its cost and its coverage.

Cost: one 2,000-resample patient-level bootstrap of BreakHis-sized pooled predictions (80
patients, ~2,000 images at one magnification; binary with the evaluation's metrics, and the
8-class subtype task), against scoring the same resamples one by one with
``metrics.classification_metrics`` (timed on ``--loop`` materialised resamples and scaled
to 2,000). Coverage: on simulated clustered evaluations (scores ``±a + u + e``, ``u`` the
patient's random effect), how often the 95% interval holds the true accuracy
``Phi(a / sqrt(sd_u^2 + sd_e^2))``, patient-level vs an image-level bootstrap of the same data.

    python bench/intervals.py [--quick] [--record]
"""

from __future__ import annotations

import math
import time

import numpy as np
from _common import finish, load_start, log, parser
from scipy import stats

from dala_search.evaluate import EVAL_METRICS
from dala_search.intervals import ClusterTable, cluster_bootstrap, materialise, resample_counts
from dala_search.metrics import MULTICLASS_METRICS, PATIENT_METRICS, classification_metrics

GOAL_S = 5.0  # a 2,000-resample interval of one magnification within a few seconds


def pooled(rng: np.random.Generator, patients: int, images: int, n_classes: int):
    """``patients`` patients spread over the classes, ~``images`` images each (varying)."""
    y, p, s = [], [], []
    for j in range(patients):
        c = j % n_classes
        m = int(rng.integers(images // 2, images * 3 // 2 + 1))
        logits = rng.normal(0, 1, (m, n_classes)) + rng.normal(0, 1, n_classes)
        logits[:, c] += 1.0
        prob = np.exp(logits)
        y += [c] * m
        p.append(np.round(prob / prob.sum(1, keepdims=True), 3))
        s += [f"P{j}"] * m
    prob = np.vstack(p)
    return np.array(y), prob / prob.sum(1, keepdims=True), s


def timed(fn, reps: int) -> float:
    """The best of ``reps`` wall times (the machine is shared: the minimum is the cost)."""
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def coverage(sims: int, resamples: int) -> dict[str, float]:
    a, sd_u, sd_e, per_class, images = 0.8, 1.2, 1.0, 20, 15
    truth = stats.norm.cdf(a / math.hypot(sd_u, sd_e))
    rng = np.random.default_rng(2026)
    covered = {"patient": 0, "image": 0}
    for i in range(sims):
        labels = np.repeat([0, 1], per_class)
        u = rng.normal(0, sd_u, 2 * per_class)
        noise = rng.normal(0, sd_e, (2 * per_class, images))
        score = (2 * labels - 1)[:, None] * a + u[:, None] + noise
        pos = 1 / (1 + np.exp(-score.ravel()))
        y, p = np.repeat(labels, images), np.column_stack([1 - pos, pos])
        patients = [f"P{j}" for j in range(2 * per_class) for _ in range(images)]
        for kind, clusters in (("patient", patients), ("image", [str(k) for k in range(len(y))])):
            iv = cluster_bootstrap(y, p, clusters, ["accuracy"], seed=i, n_resamples=resamples)
            covered[kind] += iv["accuracy"].low <= truth <= iv["accuracy"].high
    return {k: v / sims for k, v in covered.items()}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--loop", type=int, default=40, help="resamples scored one by one (timed)")
    args = p.parse_args()
    start_load = load_start()
    patients, images, resamples, reps, sims = 80, 25, 2000, 3, 200
    if args.quick:
        sims = 100
    if args.tiny:
        patients, images, resamples, reps, sims, args.loop = 12, 6, 200, 1, 4, 3
    rng = np.random.default_rng(0)
    y, prob, s = pooled(rng, patients, images, 2)
    y8, prob8, s8 = pooled(rng, patients, images, 8)
    log(f"binary: {len(y)} images of {patients} patients; {resamples} resamples")
    vec_binary = timed(
        lambda: cluster_bootstrap(y, prob, s, EVAL_METRICS, n_resamples=resamples), reps
    )
    names8 = MULTICLASS_METRICS + PATIENT_METRICS
    vec_subtype = timed(
        lambda: cluster_bootstrap(y8, prob8, s8, names8, n_resamples=resamples), reps
    )
    table = ClusterTable(y, prob, s, None, positive=1)
    counts = resample_counts(table.strata, args.loop, np.random.default_rng(1))
    copies = [materialise(y, prob, s, c) for c in counts]

    def loop() -> None:
        for yy, pp, ss in copies:
            classification_metrics(yy, pp, slides=ss)

    loop_binary = timed(loop, reps) / args.loop * resamples
    log(f"coverage: {sims} simulated evaluations of 40 patients x 15 images")
    cov = coverage(sims, 1000 if not args.tiny else 100)
    result = {
        "images": len(y),
        "patients": patients,
        "resamples": resamples,
        "vectorised_s_binary": vec_binary,
        "vectorised_s_subtype": vec_subtype,
        "loop_s_binary": loop_binary,
        "ratio": loop_binary / vec_binary,
        "coverage_sims": sims,
        "coverage_patient": cov["patient"],
        "coverage_image": cov["image"],
        "goal": f"a {resamples}-resample interval of ~2,000 images in <= {GOAL_S:g} s; "
        "patient-level coverage near 95%, image-level clearly below",
        "_load_start": start_load,
    }
    summary = "\n".join(
        [
            f"{resamples}-resample patient-level bootstrap, {len(y)} images of {patients} "
            f"patients (best of {reps}):",
            f"  binary, {len(EVAL_METRICS)} metrics incl. ROC AUC and patient accuracy: "
            f"{vec_binary:.3f} s",
            f"  8-class subtype, {len(names8)} metrics: {vec_subtype:.3f} s",
            f"  classification_metrics per resample instead (binary, {args.loop} timed, "
            f"scaled): {loop_binary:.1f} s ({loop_binary / vec_binary:.0f}x)",
            f"coverage of the true accuracy by the 95% interval, {sims} simulations:",
            f"  patient-level {cov['patient']:.1%}, image-level {cov['image']:.1%}",
        ]
    )
    finish("intervals", args, result, summary)


if __name__ == "__main__":
    main()
