"""Figures others published, shown beside ours in their own clearly labelled rows.

Never our result: the report and ``baselines --json`` print them as "published", with the
citation, and never compute anything from them but the difference a reader would.
"""

from __future__ import annotations

# The DALAResNet50 paper: "Dual-Activated Lightweight Attention ResNet50 for Automatic
# Histopathology Breast Cancer Image Classification", arXiv:2308.13150 (abstract: "achieving
# accuracies of 98.5%, 98.7%, 97.9%, and 94.3%" at 40X, 100X, 200X and 400X). The paper
# does not say its split is patient-disjoint; like most BreakHis papers it very likely
# split images, which leaks patients between train and test (data/protocols.py).
PAPER_CITATION = (
    "Dual-Activated Lightweight Attention ResNet50 for Automatic Histopathology Breast "
    "Cancer Image Classification (DALAResNet50), arXiv:2308.13150"
)
PUBLISHED_LABEL = "published (paper, image-level protocol likely)"

# magnification -> metric -> value in [0, 1]; only what the paper states.
DALARESNET50_PUBLISHED: dict[str, dict[str, float]] = {
    "40X": {"accuracy": 0.985},
    "100X": {"accuracy": 0.987},
    "200X": {"accuracy": 0.979},
    "400X": {"accuracy": 0.943},
}


def published_rows(magnification: str) -> list[dict[str, object]]:
    """The published rows of one magnification (JSON-ready; empty where none)."""
    figures = DALARESNET50_PUBLISHED.get(magnification)
    if not figures:
        return []
    return [
        {
            "model": "DALAResNet50",
            "label": PUBLISHED_LABEL,
            "source": PAPER_CITATION,
            "metrics": dict(figures),
        }
    ]
