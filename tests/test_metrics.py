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
    # F1 is defined for every tag: macro-F1 averages all of them, as scikit-learn does (no exclusion)
    assert scores.macro_f1 == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
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


def test_macro_f1_counts_a_tag_absent_from_the_split_like_sklearn():
    # 20 tags; tag 7 has no positive in this split but is predicted positive on 5 tracks. scikit-learn's
    # macro-F1 (zero_division=0) counts it as F1 0; dropping it (the old behaviour) inflated macro-F1 by 1/19.
    rng = np.random.default_rng(11)
    n, k = 200, 20
    y = (rng.random((n, k)) < 0.3).astype(np.float64)
    y[:, 7] = 0
    logits = np.where(y > 0, 1.0, -1.0) + rng.normal(0, 0.9, size=(n, k))
    logits[:, 7] = -3.0
    logits[:5, 7] = 3.0  # five false positives on the absent tag
    pred = logits > 0
    scores = tagging_scores(y, logits)
    expected = f1_score(y, pred, average="macro", zero_division=0)
    assert scores.macro_f1 == pytest.approx(expected, abs=1e-12)
    without_absent = f1_score(np.delete(y, 7, 1), np.delete(pred, 7, 1), average="macro", zero_division=0)
    assert scores.macro_f1 == pytest.approx(without_absent * 19 / 20, abs=1e-12)
    assert scores.macro_f1 < without_absent - 0.03
    # ROC-AUC/AP keep the documented exclusion (sklearn cannot score a tag without both classes)
    assert scores.excluded_tags == ["tag7"]
    assert scores.roc_auc == pytest.approx(roc_auc_score(np.delete(y, 7, 1), np.delete(logits, 7, 1)), abs=1e-12)
    # and a tag absent and never predicted scores 0 too (zero_division=0)
    logits[:5, 7] = -3.0
    assert tagging_scores(y, logits).macro_f1 == pytest.approx(
        f1_score(y, logits > 0, average="macro", zero_division=0), abs=1e-12)


def test_batched_auc_is_undefined_for_diverged_probes_and_unscorable_labels():
    y, _ = _random_case(4, n=40, k=3)
    logits = torch.randn(3, 40, 3, dtype=torch.float64)
    logits[1, 5, 2] = float("nan")  # one diverged probe
    auc = batched_macro_roc_auc(torch.tensor(y), logits)
    assert torch.isfinite(auc[[0, 2]]).all() and torch.isnan(auc[1])
    no_both = np.zeros((40, 3))
    no_both[:, 0] = 1  # every tag lacks a class
    assert torch.isnan(batched_macro_roc_auc(torch.tensor(no_both), logits)).all()
