import pytest
import torch

from asft_ray.config import Pattern
from asft_ray.errors import AsftError
from asft_ray.pruning import masks
from asft_ray.pruning.masks import is_valid_nm, make_mask, nm_mask, unstructured_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.99])
def test_unstructured_per_row_is_exact_per_matrix_and_within_one_per_row(sparsity):
    scores = torch.randn(37, 101)
    keep = unstructured_mask(scores, sparsity, per_row=True)
    pruned_per_row = (~keep).sum(1)
    assert int(pruned_per_row.sum()) == round(37 * 101 * sparsity)
    assert int(pruned_per_row.max() - pruned_per_row.min()) <= 1
    assert torch.all((pruned_per_row - 101 * sparsity).abs() < 1)


def test_unstructured_per_row_prunes_the_lowest_scores_of_each_row():
    scores = torch.randn(8, 20)
    keep = unstructured_mask(scores, 0.5, per_row=True)
    for row in range(8):
        assert scores[row][~keep[row]].max() <= scores[row][keep[row]].min()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_unstructured_per_matrix_is_exact_and_global(sparsity):
    scores = torch.randn(40, 50)
    keep = unstructured_mask(scores, sparsity, per_row=False)
    assert int((~keep).sum()) == round(2000 * sparsity)
    assert scores[~keep].max() <= scores[keep].min()


def test_ties_are_broken_the_same_way_every_time():
    scores = torch.zeros(4, 16)  # all tied
    a = unstructured_mask(scores, 0.5)
    b = unstructured_mask(scores.clone(), 0.5)
    assert torch.equal(a, b)
    assert torch.all((~a).sum(1) == 8)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_exactly_n_of_every_m(n, m):
    scores = torch.randn(16, 64)
    keep = nm_mask(scores, n, m)
    assert torch.all(keep.reshape(16, 64 // m, m).sum(-1) == n)
    assert is_valid_nm(torch.randn(16, 64) * keep, n, m)


def test_nm_keeps_the_highest_in_each_group():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0]])
    keep = nm_mask(scores, 2, 4)
    assert keep.tolist() == [[False, True, True, False, True, False, False, True]]


def test_is_valid_nm_detects_a_bad_group():
    w = torch.ones(2, 8)
    assert not is_valid_nm(w, 2, 4)
    w[:, ::2] = 0
    assert is_valid_nm(w, 2, 4)


def test_nm_width_not_a_multiple_of_m_is_a_clear_error():
    with pytest.raises(AsftError, match="multiple of 4"):
        nm_mask(torch.randn(3, 10), 2, 4)


def test_make_mask_dispatches_on_pattern():
    scores = torch.randn(8, 16)
    assert torch.equal(make_mask(scores, Pattern.parse("2:4"), 0.5), nm_mask(scores, 2, 4))
    assert torch.equal(make_mask(scores, Pattern.parse("unstructured"), 0.25), unstructured_mask(scores, 0.25))


@pytest.mark.parametrize("shape", [(7, 13), (300, 500), (1, 4000), (64, 100, 4)])
def test_rows_sorted_a_block_at_a_time_give_the_mask_of_one_whole_sort(shape, monkeypatch):
    """prune_lowest sorts SORT_BLOCK_ELEMENTS scores per call; with ties and per-row counts the
    mask equals the one a single sort of the whole tensor gives."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(*shape, generator=g).round(decimals=1)  # many ties
    per_row = torch.randint(0, shape[-1], shape[:-1], generator=g)
    for k in (3, per_row):
        whole = torch.ones_like(scores, dtype=torch.bool)
        order = torch.sort(scores, dim=-1, stable=True).indices
        whole.scatter_(-1, order, torch.arange(shape[-1]) >= torch.as_tensor(k).unsqueeze(-1).expand(*shape[:-1], 1))
        monkeypatch.setattr(masks, "SORT_BLOCK_ELEMENTS", 512)  # several blocks for every shape but the 1-row one
        assert torch.equal(masks.prune_lowest(scores, k), whole)
