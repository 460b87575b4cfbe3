import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from culturemert.evaluate.metrics import (
    average_precision_per_tag,
    batched_macro_roc_auc,
    roc_auc_per_tag,
    tagging_scores,
    valid_tag_mask,
)


def _random_case(seed: int, n: int = 120, k: int = 9, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < rng.uniform(0.05, 0.6, size=k)).astype(np.float64)
    s = rng.normal(size=(n, k)) + y * rng.uniform(0, 2, size=k)
    if ties:
        s = np.round(s, 0)  # many tied scores
    return y, s


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True), (3, False)])
def test_per_tag_auc_and_ap_equal_sklearn(seed, ties):
    y, s = _random_case(seed, ties=ties)
    auc = roc_auc_per_tag(y, s).numpy()
    ap = average_precision_per_tag(y, s).numpy()
    for k in range(y.shape[1]):
        assert auc[k] == pytest.approx(roc_auc_score(y[:, k], s[:, k]), abs=1e-12)
        assert ap[k] == pytest.approx(average_precision_score(y[:, k], s[:, k]), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 5])
def test_macro_metrics_and_f1_equal_sklearn(seed):
    y, s = _random_case(seed, ties=seed == 5)
    scores = tagging_scores(y, s)
    assert scores.excluded_tags == []
    assert scores.roc_auc == pytest.approx(roc_auc_score(y, s, average="macro"), abs=1e-12)
    assert scores.ap == pytest.approx(average_precision_score(y, s, average="macro"), abs=1e-12)
    pred = (1 / (1 + np.exp(-s))) > 0.5
    assert scores.micro_f1 == pytest.approx(f1_score(y, pred, average="micro"), abs=1e-12)
    assert scores.macro_f1 == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)


def test_tags_without_positives_or_negatives_are_excluded_and_reported():
    y, s = _random_case(7)
    y[:, 2] = 0  # no positives
    y[:, 5] = 1  # no negatives
    vocab = [f"t{i}" for i in range(y.shape[1])]
    scores = tagging_scores(y, s, vocab)
    assert scores.excluded_tags == ["t2", "t5"]
    keep = [k for k in range(y.shape[1]) if k not in (2, 5)]
    assert scores.roc_auc == pytest.approx(roc_auc_score(y[:, keep], s[:, keep], average="macro"), abs=1e-12)
    assert scores.ap == pytest.approx(average_precision_score(y[:, keep], s[:, keep]), abs=1e-12)
    pred = s > 0
    assert scores.macro_f1 == pytest.approx(f1_score(y[:, keep], pred[:, keep], average="macro", zero_division=0), abs=1e-12)
    # micro-F1 pools all tags, excluded ones included
    assert scores.micro_f1 == pytest.approx(f1_score(y, pred, average="micro"), abs=1e-12)
    assert np.isnan(roc_auc_per_tag(y, s).numpy()[[2, 5]]).all()
    assert valid_tag_mask(y).tolist() == [k in keep for k in range(y.shape[1])]


def test_batched_macro_auc_equals_per_probe():
    y, _ = _random_case(3, n=60, k=5)
    y[:, 4] = 0
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 60, 5))
    batched = batched_macro_roc_auc(torch.tensor(y), torch.tensor(logits)).numpy()
    for p in range(4):
        assert batched[p] == pytest.approx(roc_auc_score(y[:, :4], logits[p][:, :4], average="macro"), abs=1e-12)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must both be"):
        tagging_scores(np.zeros((3, 2)), np.zeros((3, 3)))
