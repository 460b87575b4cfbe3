"""Tests for the merge methods beyond task arithmetic and for TIES' trimming scope, each against a formula
written here: global vs per-tensor trimming, Model Breadcrumbs, DELLA, TSV-Merge, Iso-C and Iso-CTS."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from culturemert.errors import ConfigError
from culturemert.merge import (
    GlobalMagnitudeRanks,
    MergeOptions,
    merge_state_dicts,
    merge_with_report,
)

# ------------------------------------------------------------------------------------------- reference formulas


def _kth_largest(values: torch.Tensor, k: int) -> float:
    return float(values.abs().flatten().sort(descending=True).values[k - 1])


def _ties_reference(trimmed: list[torch.Tensor], lam: float) -> torch.Tensor:
    """TIES' elect + disjoint mean (Yadav et al. 2023, Algorithm 1, steps 2-3), λ after the mean."""
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (sign != 0)
    return lam * (stacked * agree).sum(0) / agree.sum(0).clamp_min(1)


def _inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(gram)
    return vectors @ torch.diag(values.rsqrt()) @ vectors.T


def _polar_columns(a: torch.Tensor) -> torch.Tensor:
    """A (AᵀA)^(-1/2): the orthogonal polar factor of a full-column-rank A, via the eigen-decomposition."""
    return a @ _inverse_sqrt(a.T @ a)


def _polar_rows(a: torch.Tensor) -> torch.Tensor:
    """(AAᵀ)^(-1/2) A for a full-row-rank A."""
    return _inverse_sqrt(a @ a.T) @ a


def _two_scale_inputs(n_models: int = 2, seed: int = 0) -> tuple[dict, list[dict]]:
    """Two tensors whose task vectors differ 10x in scale (float64, so the formulas compare exactly)."""
    g = torch.Generator().manual_seed(seed)
    base = {"small": torch.randn(6, 5, generator=g, dtype=torch.float64), "large": torch.randn(20, generator=g, dtype=torch.float64)}
    models = []
    for _ in range(n_models):
        models.append({
            "small": base["small"] + 0.01 * torch.randn(6, 5, generator=g, dtype=torch.float64),
            "large": base["large"] + 0.1 * torch.randn(20, generator=g, dtype=torch.float64),
        })
    return base, models


def _taus(base: dict, models: list[dict], name: str) -> list[torch.Tensor]:
    return [m[name] - base[name] for m in models]


# ------------------------------------------------------------------------------------------- global magnitude ranks


def test_global_magnitude_ranks_equal_sorting_the_concatenation() -> None:
    g = torch.Generator().manual_seed(3)
    # very different scales, exact zeros and many exact ties (quantised values) in one bin
    pieces = [
        torch.randn(1000, generator=g, dtype=torch.float64) * 1e-3,
        torch.round(torch.randn(500, generator=g, dtype=torch.float64) * 8) / 8,
        torch.zeros(50, dtype=torch.float64),
        torch.randn(7, 3, generator=g, dtype=torch.float64) * 1e4,
    ]
    everything = torch.cat([p.flatten() for p in pieces])
    ranks = [1, 2, 21, 22, 300, 777, 1200, everything.numel() - 49, everything.numel()]
    selector = GlobalMagnitudeRanks()
    for p in pieces:
        selector.count(p)
    selector.plan(ranks)
    for p in pieces:
        selector.collect(p)
    assert selector.values() == [_kth_largest(everything, k) for k in ranks]
    with pytest.raises(ValueError, match="rank 0 outside"):
        selector.plan([0])


# ------------------------------------------------------------------------------------------- TIES trimming scope


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_ties_trim_scope_matches_its_reference_formula(scope: str) -> None:
    base, models = _two_scale_inputs()
    density = 0.25
    merged = merge_state_dicts(base, models, "ties", 0.7, density=density, trim_scope=scope)
    taus = {name: _taus(base, models, name) for name in base}
    trimmed: dict[str, list[torch.Tensor]] = {name: [] for name in base}
    for i in range(len(models)):
        if scope == "per_tensor":  # k = ⌈density · numel⌉ largest of each tensor
            for name in base:
                tau = taus[name][i]
                threshold = _kth_largest(tau, math.ceil(density * tau.numel()))
                trimmed[name].append(torch.where(tau.abs() >= threshold, tau, 0.0))
        else:  # the reference code's topk_values_mask on the flattened model: one threshold per model
            flat = torch.cat([taus[name][i].flatten() for name in base])
            threshold = _kth_largest(flat, math.ceil(density * flat.numel()))
            for name in base:
                tau = taus[name][i]
                trimmed[name].append(torch.where(tau.abs() >= threshold, tau, 0.0))
    for name in base:
        assert torch.equal(merged[name], base[name] + _ties_reference(trimmed[name], 0.7)), name
    # The large tensor's updates are 10x larger: globally, almost everything kept comes from it.
    kept = {name: sum(int((t != 0).sum()) for t in trimmed[name]) for name in base}
    if scope == "global":
        assert kept["small"] == 0 and kept["large"] == 2 * math.ceil(density * 50)
    else:
        assert kept["small"] == 2 * math.ceil(density * 30) and kept["large"] == 2 * math.ceil(density * 20)


def test_global_trim_scope_respects_the_merge_scope_and_is_recorded() -> None:
    base, models = _two_scale_inputs(n_models=1)
    options = MergeOptions(method="ties", lambdas=1.0, density=0.5, trim_scope="global", exclude=["large"])
    merged, report = merge_with_report(base, models, options, progress=False)
    # With 'large' out of scope, the global ranking runs over 'small' alone: the same as per-tensor trimming.
    tau = models[0]["small"] - base["small"]
    threshold = _kth_largest(tau, 15)
    assert torch.equal(merged["small"], base["small"] + torch.where(tau.abs() >= threshold, tau, 0.0))
    assert torch.equal(merged["large"], base["large"])
    assert report.hyperparameters == {"density": 0.5, "trim_scope": "global"}
    assert report.global_bands == [(threshold, math.inf)]


# ------------------------------------------------------------------------------------------- breadcrumbs


def _breadcrumbs_reference(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's magnitude_outliers: sort ascending, keep indices[n_bottom : numel - n_top]."""
    numel = tau.numel()
    n_keep, n_top = int(density * numel), int(gamma * numel)
    n_bottom = numel - n_keep - n_top
    if n_bottom < 0:
        n_top, n_bottom = n_top + n_bottom, 0
    order = tau.abs().flatten().argsort()
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[order[n_bottom : numel - n_top]] = True
    return torch.where(mask.view(tau.shape), tau, 0.0)


@pytest.mark.parametrize("density, gamma", [(0.5, 0.1), (0.9, 0.01), (0.9, 0.3), (0.3, 0.0)])
def test_breadcrumbs_per_tensor_matches_mergekit_formula(density: float, gamma: float) -> None:
    base, models = _two_scale_inputs(n_models=3)
    lambdas = [0.3, 0.5, 0.2]
    merged = merge_state_dicts(base, models, "breadcrumbs", lambdas, density=density, gamma=gamma)
    for name in base:
        expected = base[name].clone()
        for lam, tau in zip(lambdas, _taus(base, models, name), strict=True):
            expected += lam * _breadcrumbs_reference(tau, density, gamma)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-15)


def test_breadcrumbs_global_scope_ranks_over_the_model() -> None:
    base, models = _two_scale_inputs(n_models=1)
    merged = merge_state_dicts(base, models, "breadcrumbs", 1.0, density=0.4, gamma=0.1, trim_scope="global")
    taus = {name: models[0][name] - base[name] for name in base}
    flat = torch.cat([t.flatten() for t in taus.values()])  # 50 entries: 5 removed from the top, 20 kept
    upper, lower = _kth_largest(flat, 5), _kth_largest(flat, 25)
    for name, tau in taus.items():
        keep = (tau.abs() >= lower) & (tau.abs() < upper)
        assert torch.equal(merged[name], base[name] + torch.where(keep, tau, 0.0)), name
    # the 5 entries removed from the top are the 10x tensor's 5 largest
    top5 = taus["large"].abs().argsort(descending=True)[:5]
    assert torch.equal(merged["large"][top5], base["large"][top5])
    assert bool(((merged["large"] - base["large"]) != 0).any())


def test_breadcrumbs_without_masking_is_task_arithmetic() -> None:
    base, models = _two_scale_inputs(n_models=3)
    ta = merge_state_dicts(base, models, "task_arithmetic", [0.2, 0.4, 0.1])
    for gamma in (0.0, 0.2):  # density 1 keeps everything whatever gamma says (as mergekit)
        crumbs = merge_state_dicts(base, models, "breadcrumbs", [0.2, 0.4, 0.1], density=1.0, gamma=gamma)
        assert all(torch.equal(crumbs[k], ta[k]) for k in ta)


# ------------------------------------------------------------------------------------------- DELLA


def _della_keep_probability(rows: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """q = (1 − p − ε) + 2ε · rank / (n − 1), rank 0 for the smallest magnitude of each row."""
    n = rows.shape[1]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).double()
    return (1 - p - eps) + 2 * eps * ranks / (n - 1)


def test_della_survivors_are_rescaled_by_their_rank_probability() -> None:
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.zeros(2, 400, dtype=torch.float64)}
    tau = torch.randn(2, 400, generator=g, dtype=torch.float64) * torch.tensor([[100.0], [1.0]], dtype=torch.float64)
    merged = merge_state_dicts(base, [{"w": tau}], "della", 1.0, drop_rate=0.4, epsilon=0.3, seed=1,
                               allow_unrelated=True)
    result = merged["w"]
    q = _della_keep_probability(tau, 0.4, 0.3)  # rows ranked separately although their scales differ 100x
    kept = result != 0
    torch.testing.assert_close(result[kept], (tau / q)[kept], rtol=1e-14, atol=0)
    again = merge_state_dicts(base, [{"w": tau}], "della", 1.0, drop_rate=0.4, epsilon=0.3, seed=1,
                              allow_unrelated=True)
    assert torch.equal(again["w"], result)


def test_della_keep_rate_follows_magnitude_rank() -> None:
    n = 40_000
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(n, dtype=torch.float64)}
    tau = torch.randn(n, generator=g, dtype=torch.float64)
    merged = merge_state_dicts(base, [{"w": tau}], "della", 1.0, drop_rate=0.5, epsilon=0.3, allow_unrelated=True)
    order = tau.abs().argsort()
    kept = (merged["w"] != 0)[order].double()
    # keep probability rises linearly from 0.2 (smallest) to 0.8 (largest): decile means 0.23 and 0.77
    assert kept[: n // 10].mean().item() == pytest.approx(0.23, abs=0.02)
    assert kept[-(n // 10):].mean().item() == pytest.approx(0.77, abs=0.02)
    assert kept.mean().item() == pytest.approx(0.5, abs=0.01)


def test_della_without_dropping_is_ties_without_trimming() -> None:
    base, models = _two_scale_inputs(n_models=3)
    della = merge_state_dicts(base, models, "della", [1.0, 0.5, 0.8], drop_rate=0.0, epsilon=0.0)
    ties = merge_state_dicts(base, models, "ties", [1.0, 0.5, 0.8], density=1.0)
    assert all(torch.equal(della[k], ties[k]) for k in ties)


# ------------------------------------------------------------------------------------------- TSV, Iso-C, Iso-CTS


def _spectral_inputs(shape: tuple[int, int], n_models: int, seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {
        "w": torch.randn(*shape, generator=g, dtype=torch.float64),
        "b": torch.randn(shape[0], generator=g, dtype=torch.float64),
        "conv": torch.randn(3, 2, 4, generator=g, dtype=torch.float64),
    }
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
              for _ in range(n_models)]
    return base, models


def _mean_rule(base: dict, models: list[dict], name: str, alpha: float) -> torch.Tensor:
    return base[name] + alpha * sum(_taus(base, models, name)) / len(models)


def test_iso_c_on_one_task_vector_flattens_its_spectrum() -> None:
    base, models = _spectral_inputs((7, 5), 1)
    merged = merge_state_dicts(base, models, "iso_c", 1.3, allow_unrelated=True)
    tau = models[0]["w"] - base["w"]
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    update = merged["w"] - base["w"]
    torch.testing.assert_close(torch.linalg.svdvals(update), torch.full((5,), 1.3 * s.mean().item(), dtype=torch.float64))
    torch.testing.assert_close(update, 1.3 * s.mean() * u @ vh)  # the task vector's own singular vectors
    for name in ("b", "conv"):  # not 2-D: the mean task vector, here the task vector itself
        torch.testing.assert_close(merged[name], base[name] + 1.3 * (models[0][name] - base[name]))


def test_iso_c_matches_formula_for_several_tasks() -> None:
    base, models = _spectral_inputs((6, 9), 3)
    merged = merge_state_dicts(base, models, "iso_c", 0.8)
    u, s, vh = torch.linalg.svd(sum(_taus(base, models, "w")), full_matrices=False)
    torch.testing.assert_close(merged["w"], base["w"] + 0.8 * s.mean() * u @ vh)
    for name in ("b", "conv"):
        torch.testing.assert_close(merged[name], _mean_rule(base, models, name, 0.8))


def test_tsv_with_orthogonal_low_rank_task_vectors_is_task_arithmetic() -> None:
    g = torch.Generator().manual_seed(2)
    m, n, k = 12, 10, 5  # rank 10, two tasks of rank 5 = ⌊10 / 2⌋ each, in orthogonal subspaces
    left, _ = torch.linalg.qr(torch.randn(m, 2 * k, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, 2 * k, generator=g, dtype=torch.float64))
    base = {"w": torch.randn(m, n, generator=g, dtype=torch.float64), "b": torch.randn(m, generator=g, dtype=torch.float64)}
    models = []
    for t in range(2):
        spectrum = torch.diag(torch.rand(k, generator=g, dtype=torch.float64) + 0.5)
        tau = left[:, t * k : (t + 1) * k] @ spectrum @ right[:, t * k : (t + 1) * k].T
        models.append({"w": base["w"] + 0.1 * tau, "b": base["b"] + 0.1 * torch.randn(m, generator=g, dtype=torch.float64)})
    tsv = merge_state_dicts(base, models, "tsv", 0.7)
    ta = merge_state_dicts(base, models, "task_arithmetic", 0.7)
    torch.testing.assert_close(tsv["w"], ta["w"], rtol=0, atol=1e-12)
    ta_mean = merge_state_dicts(base, models, "task_arithmetic", 0.7, mean=True)  # 1-D tensors: mean task vector
    torch.testing.assert_close(tsv["b"], ta_mean["b"], rtol=0, atol=1e-14)


def test_tsv_matches_formula_for_overlapping_tasks() -> None:
    base, models = _spectral_inputs((8, 11), 3)
    merged = merge_state_dicts(base, models, "tsv", 1.0)
    k = 8 // 3  # rank 8, three tasks: 2 directions each (the reference's int(8 · 1/3))
    us, ss, vhs = [], [], []
    for tau in _taus(base, models, "w"):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    expected = _polar_columns(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ _polar_rows(torch.cat(vhs, 0))
    torch.testing.assert_close(merged["w"], base["w"] + expected)
    for name in ("b", "conv"):
        torch.testing.assert_close(merged[name], _mean_rule(base, models, name, 1.0))
    # a smaller rank fraction keeps fewer directions per task
    half = merge_state_dicts(base, models, "tsv", 1.0, rank_fraction=0.125)  # 1 direction each
    u1 = [torch.linalg.svd(t, full_matrices=False) for t in _taus(base, models, "w")]
    expected = (_polar_columns(torch.cat([u[:, :1] for u, _, _ in u1], 1)) @ torch.diag(torch.cat([s[:1] for _, s, _ in u1]))
                @ _polar_rows(torch.cat([vh[:1] for _, _, vh in u1], 0)))
    torch.testing.assert_close(half["w"], base["w"] + expected)


def test_iso_cts_matches_formula() -> None:
    base, models = _spectral_inputs((9, 7), 3, seed=4)
    merged = merge_state_dicts(base, models, "iso_cts", 1.1, common_fraction=0.5)
    taus = _taus(base, models, "w")
    # rank 7: common ⌊3.5⌋ = 3, remainder 4 rounds to 1 per task (3 in all), so the common subspace gets 4
    common, per_task = 4, 1
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    uc, sc, vhc = u[:, :common], s[:common], vh[:common]
    us, ss, vhs = [uc], [sc], [vhc]
    for tau in taus:
        ut, st, vht = torch.linalg.svd(tau - uc @ uc.T @ tau, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vhs.append(vht[:per_task])
    spectrum = torch.cat(ss)
    assert spectrum.numel() == 7
    expected = spectrum.mean() * _polar_columns(torch.cat(us, 1)) @ _polar_rows(torch.cat(vhs, 0))
    torch.testing.assert_close(merged["w"], base["w"] + 1.1 * expected)
    for name in ("b", "conv"):
        torch.testing.assert_close(merged[name], _mean_rule(base, models, name, 1.1))


# ------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "dare", "trim_scope": "global"}, "trim_scope applies to method 'ties' and 'breadcrumbs', not 'dare'"),
        ({"method": "ties", "gamma": 0.1}, "gamma applies to method 'breadcrumbs', not 'ties'"),
        ({"method": "tsv", "epsilon": 0.1}, "epsilon applies to method 'della'"),
        ({"method": "iso_c", "common_fraction": 0.5}, "common_fraction applies to method 'iso_cts'"),
        ({"method": "iso_cts", "rank_fraction": 0.5}, "rank_fraction applies to method 'tsv'"),
        ({"method": "breadcrumbs", "gamma": 1.0}, "gamma"),
        ({"method": "ties", "trim_scope": "model"}, "trim_scope"),
        ({"method": "della", "drop_rate": 0.2, "epsilon": 0.3}, "della needs epsilon <= drop_rate"),
        ({"method": "della", "drop_rate": 0.8, "epsilon": 0.2}, "drop_rate \\+ epsilon < 1"),
        ({"method": "tsv", "lambdas": [1.0, 1.0]}, "one α"),
        ({"method": "iso_c", "mean": True}, "already averages"),
        ({"method": "tsv", "rank_fraction": 0.0}, "rank_fraction"),
    ],
)
def test_new_options_are_validated(kwargs: dict, message: str) -> None:
    base, models = _spectral_inputs((4, 4), 2)
    with pytest.raises(ConfigError, match=message):
        merge_state_dicts(base, models, **kwargs)


def test_tsv_rank_fraction_must_fit_all_tasks() -> None:
    base, models = _spectral_inputs((4, 4), 3)
    with pytest.raises(ConfigError, match=r"rank_fraction 0.5 x 3 models exceeds 1"):
        merge_state_dicts(base, models, "tsv", rank_fraction=0.5)


def test_hyperparameters_resolve_method_defaults() -> None:
    assert MergeOptions(method="ties").hyperparameters(4) == {"density": 0.2, "trim_scope": "per_tensor"}
    assert MergeOptions(method="breadcrumbs").hyperparameters(4) == {"density": 0.9, "gamma": 0.01, "trim_scope": "per_tensor"}
    assert MergeOptions(method="della").hyperparameters(4) == {"drop_rate": 0.3, "epsilon": 0.07, "seed": 0}
    assert MergeOptions(method="dare").hyperparameters(4) == {"drop_rate": 0.9, "seed": 0}
    assert MergeOptions(method="tsv").hyperparameters(4) == {"rank_fraction": 0.25}
    assert MergeOptions(method="iso_cts").hyperparameters(4) == {"common_fraction": 0.8}
    assert MergeOptions(method="iso_c").hyperparameters(4) == {}


def test_float64_inputs_are_not_modified_by_the_merge() -> None:
    base, models = _spectral_inputs((4, 3), 2)
    copies = [{k: v.clone() for k, v in m.items()} for m in models]
    for method in ("task_arithmetic", "dare", "breadcrumbs", "ties", "tsv"):
        merge_state_dicts(base, models, method, 0.5)
        for model, copy in zip(models, copies, strict=True):
            assert all(torch.equal(model[k], copy[k]) for k in copy), method


# ------------------------------------------------------------------------------------------- end to end


def _tiny_exports(tmp_path: Path, n: int = 3) -> tuple[Path, list[Path]]:
    import copy

    from culturemert.model import model_fingerprint, save_export
    from culturemert.model import build_model

    base = build_model("tiny", seed=0)
    save_export(base, tmp_path / "base")
    paths = []
    g = torch.Generator().manual_seed(11)
    for i in range(n):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        save_export(model, tmp_path / f"culture{i}", base_fingerprint=model_fingerprint(base))
        paths.append(tmp_path / f"culture{i}")
    return tmp_path / "base", paths


@pytest.mark.parametrize(
    "method, flags, hyperparameters",
    [
        ("breadcrumbs", ["--density", "0.8", "--gamma", "0.05", "--lambda", "0.3"],
         {"density": 0.8, "gamma": 0.05, "trim_scope": "per_tensor"}),
        ("della", ["--drop-rate", "0.5", "--epsilon", "0.2", "--seed", "4"],
         {"drop_rate": 0.5, "epsilon": 0.2, "seed": 4}),
        ("tsv", ["--lambda", "0.9"], {"rank_fraction": 1 / 3}),
        ("iso_c", ["--lambda", "1.2"], {}),
        ("iso_cts", ["--common-fraction", "0.6"], {"common_fraction": 0.6}),
        ("ties", ["--trim-scope", "global", "--density", "0.3"], {"density": 0.3, "trim_scope": "global"}),
    ],
)
def test_cli_merge_with_each_method_records_it(tmp_path: Path, method: str, flags: list[str], hyperparameters: dict) -> None:
    from culturemert.model import load_model, model_fingerprint, read_export_metadata
    from culturemert.cli import main

    base_dir, model_dirs = _tiny_exports(tmp_path)
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base_dir), "--models", *map(str, model_dirs), "--method", method, *flags,
                 "--out", str(out)]) == 0
    base = load_model(str(base_dir))
    inputs = [load_model(str(d)) for d in model_dirs]
    options = MergeOptions(method=method, **{k.replace("-", "_"): v for k, v in hyperparameters.items()
                                             if k not in ("rank_fraction",)},
                           lambdas=float(flags[flags.index("--lambda") + 1]) if "--lambda" in flags else None)
    expected, report = merge_with_report(base.state_dict(), [m.state_dict() for m in inputs], options, progress=False)
    merged = load_model(str(out)).state_dict()
    assert set(merged) == set(expected)
    for name, t in expected.items():
        assert torch.equal(merged[name], t), name
    record = read_export_metadata(out)["card"]["merge"]
    assert record["method"] == method
    assert record["hyperparameters"] == pytest.approx(hyperparameters) if hyperparameters else record["hyperparameters"] == {}
    assert record["lambdas"] == report.lambdas
    assert record["fingerprint"] == model_fingerprint(load_model(str(out)))
    if method == "ties":  # global scope: the per-model thresholds are recorded
        assert [b["lower"] for b in record["global_trim_bands"]] == [b[0] for b in report.global_bands]
        assert all(b["upper"] is None for b in record["global_trim_bands"])
    else:
        assert record["global_trim_bands"] is None
    if method == "della":
        assert record["seed"] == 4


@pytest.mark.parametrize(
    "method, kwargs",
    [("breadcrumbs", {"trim_scope": "global", "gamma": 0.05}), ("della", {"seed": 2}), ("tsv", {}),
     ("iso_cts", {}), ("ties", {"trim_scope": "global"})],
)
def test_new_methods_merge_lazy_exports_exactly_like_loaded_models(tmp_path: Path, method: str, kwargs: dict) -> None:
    from culturemert.model import load_model
    from culturemert.merge import load_inputs, merge_loaded, open_inputs_lazily

    base_dir, model_dirs = _tiny_exports(tmp_path)
    options = MergeOptions(method=method, **kwargs)
    record_lazy = merge_loaded(open_inputs_lazily(base_dir, model_dirs), tmp_path / "lazy", options)
    record_eager = merge_loaded(load_inputs(base_dir, model_dirs), tmp_path / "eager", options)
    assert record_lazy == record_eager
    a, b = load_model(str(tmp_path / "lazy")).state_dict(), load_model(str(tmp_path / "eager")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
