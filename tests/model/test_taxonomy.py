import json

import pytest

from model.taxonomy import Taxonomy, TaxonomyError, load_taxonomy


def _tax(coarse, fine, multi=False):
    return {"name": "t", "levels": {"coarse": {"multi_label": multi, "labels": coarse},
                                    "fine": {"multi_label": multi, "labels": fine}}}


def test_shipped_taxonomies_load(fm_tax, ml_tax):
    assert fm_tax.coarse.labels == ("tops", "bottoms", "dresses", "outerwear", "bags", "shoes")
    assert len(fm_tax.fine.labels) == 10 and not fm_tax.multi_label
    assert all(len(p) == 1 for p in fm_tax.parents)
    assert ml_tax.multi_label and any(len(p) > 1 for p in ml_tax.parents)
    assert set(fm_tax.children[fm_tax.coarse.labels.index("shoes")]) == {5, 7, 9}


def test_round_trip(fm_tax, ml_tax):
    for tax in (fm_tax, ml_tax):
        assert Taxonomy.from_dict(json.loads(json.dumps(tax.to_dict()))) == tax


@pytest.mark.parametrize(
    "data, match",
    [
        (_tax(["a"], [{"name": "x", "parents": ["zz"]}]), "unknown parent 'zz'"),
        (_tax(["a", "a"], [{"name": "x", "parents": ["a"]}]), "duplicate coarse label 'a'"),
        (_tax(["a"], [{"name": "x", "parents": ["a"]}, {"name": "x", "parents": ["a"]}]), "duplicate fine label 'x'"),
        (_tax([], [{"name": "x", "parents": ["a"]}]), "level 'coarse' is empty"),
        (_tax(["a"], []), "level 'fine' is empty"),
        (_tax(["a"], [{"name": "x"}]), "names no parent"),
        (_tax(["a", "b"], [{"name": "x", "parents": ["a", "b"]}]), "several parents in a single-label"),
    ],
)
def test_validation_errors(data, match):
    with pytest.raises(TaxonomyError, match=match):
        Taxonomy.from_dict(data)


def test_unknown_name_lists_shipped():
    with pytest.raises(TaxonomyError, match="shipped: fashion-mnist, styles-multilabel"):
        load_taxonomy("nope")
