"""Inner folds of a cross-validated objective: the non-test patients only, each validated once."""

from __future__ import annotations

import pytest

from dala_search.data.breakhis import BreakHisIndex, index_breakhis
from dala_search.data.splits import inner_folds, min_class_patients, patient_split
from dala_search.errors import DataError


@pytest.fixture(scope="module")
def index30(tmp_path_factory, make_breakhis_tree, make_patients) -> BreakHisIndex:
    """30 patients (10 benign, 20 malignant), one magnification, 2 images each."""
    root = tmp_path_factory.mktemp("inner")
    make_breakhis_tree(root, patients=make_patients(10, 20), mags=("40X",), size=(8, 8))
    return index_breakhis(root)


@pytest.mark.parametrize("k", [2, 3])
def test_inner_folds_cover_the_non_test_patients_once(index30, k) -> None:
    records = index30.select("40X")
    split = patient_split(records, seed=3)
    folds = inner_folds(records, split, k, seed=5)
    assert len(folds) == k
    test_slides = {records[i].slide for i in split.test}
    non_test = {records[i].slide for i in split.train + split.val}
    validated: list[str] = []
    for fold in folds:
        assert fold.test == split.test  # the test side untouched
        train = {records[i].slide for i in fold.train}
        val = {records[i].slide for i in fold.val}
        assert not (train | val) & test_slides  # no test patient in any inner fold
        assert not train & val
        assert train | val == non_test
        assert {records[i].label for i in fold.val} == {"benign", "malignant"}
        assert {records[i].label for i in fold.train} == {"benign", "malignant"}
        validated.extend(val)
    assert sorted(validated) == sorted(non_test)  # every non-test patient validated once
    # seeded: the same folds again, other folds with another seed
    assert inner_folds(records, split, k, seed=5) == folds
    assert [f.val for f in inner_folds(records, split, k, seed=6)] != [f.val for f in folds]


def test_too_few_patients_of_a_class_is_a_clear_error(index30) -> None:
    records = index30.select("40X")
    split = patient_split(records, seed=3)
    pool = split.train + split.val
    benign = min_class_patients(records, pool)
    assert 2 <= benign < 10
    with pytest.raises(DataError, match="benign"):
        inner_folds(records, split, benign + 1)
    with pytest.raises(DataError, match=">= 2"):
        inner_folds(records, split, 1)
