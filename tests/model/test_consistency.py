import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from model.consistency import (
    child_mask,
    consistency_rate,
    decode_multi,
    decode_single,
    max_constraint,
    parent_index,
)
from model.taxonomy import load_taxonomy

FM = load_taxonomy("fashion-mnist")
ML = load_taxonomy("styles-multilabel")
finite = st.floats(-30, 30, allow_nan=False, width=32)


def logits(n_rows, n_cols):
    return arrays("float32", (n_rows, n_cols), elements=finite).map(torch.from_numpy)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(1, 16))
def test_single_label_decode_is_consistent(data, n):
    c = data.draw(logits(n, 6))
    f = data.draw(logits(n, 10))
    parent = parent_index(FM.parents)
    cs, fs, pc, pf = decode_single(c, f, parent)
    mask = child_mask(FM.parents, 6)
    assert consistency_rate(pc, pf, mask) == 1.0
    assert torch.equal(pc, parent[pf])
    # scores are probabilities and consistent: a parent's score is never below a child's
    assert torch.allclose(fs.sum(1), torch.ones(n), atol=1e-4)
    assert torch.allclose(cs.sum(1), torch.ones(n), atol=1e-4)
    assert (cs[:, parent] >= fs - 1e-6).all()
    # the primary pair is the best valid pair by joint log-probability (brute force)
    lc, lf = torch.log_softmax(c.double(), 1), torch.log_softmax(f.double(), 1)
    for i in range(n):
        best = max(lc[i, parent[k]] + lf[i, k] for k in range(10))
        got = lc[i, pc[i]] + lf[i, pf[i]]
        assert got >= best - 1e-6


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(1, 16))
def test_multi_label_max_constraint(data, n):
    c = data.draw(logits(n, 4))
    f = data.draw(logits(n, 10))
    mask = child_mask(ML.parents, 4)
    cs, fs, pc, pf = decode_multi(c, f, mask)
    for coarse_i, fine_i in itertools.product(range(4), range(10)):
        if mask[coarse_i, fine_i]:
            assert (cs[:, coarse_i] >= fs[:, fine_i]).all()
    assert (cs >= torch.sigmoid(c) - 1e-7).all()  # the constraint only raises scores
    assert consistency_rate(pc, pf, mask) == 1.0
    # every thresholded fine tag has a thresholded parent, at any threshold
    for t in (0.1, 0.5, 0.9):
        on = fs >= t
        parent_on = (cs >= t).float() @ mask.float()  # [n, F]: how many parents are on
        assert (~on | (parent_on > 0)).all()


def test_max_constraint_by_hand():
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    out = max_constraint(torch.tensor([[0.1, 0.9]]), torch.tensor([[0.2, 0.7, 0.3]]), mask)
    assert torch.allclose(out, torch.tensor([[0.7, 0.9]]))


def test_independent_argmax_can_be_inconsistent():
    # the seed's decoding: coarse says shoes, fine says shirt -> an invalid pair that ours never emits
    c = torch.full((1, 6), -5.0)
    c[0, 5] = 5.0
    f = torch.full((1, 10), -5.0)
    f[0, 6] = 3.0
    f[0, 7] = 2.5
    assert FM.parents[int(f.argmax())][0] != int(c.argmax())
    _, _, pc, pf = decode_single(c, f, parent_index(FM.parents))
    assert (int(pc), int(pf)) == (5, 7)  # shoes / sneaker: the best valid pair
