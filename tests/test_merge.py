"""Tests for culturemert.merge: exact identities, hand-computed TIES, DARE statistics, validation, sweeps."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from culturemert.errors import ConfigError, UserError
from culturemert.merge import (
    MergeOptions,
    format_lambda,
    merge_state_dicts,
    merge_with_report,
    parse_lambda_range,
    run_sweep,
    select_best_lambda,
)


def _base(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "backbone.feature_extractor.conv.weight": torch.randn(4, 1, 3, generator=g).to(dtype),
        "backbone.encoder.layer.0.weight": torch.randn(5, 6, generator=g).to(dtype),
        "backbone.encoder.layer.0.bias": torch.randn(6, generator=g).to(dtype),
        "heads.final_proj.weight": torch.randn(3, 5, generator=g).to(dtype),
        "backbone.step": torch.tensor([7], dtype=torch.int64),
    }


def _derived(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A model 'continually trained' from base: small perturbation of every float tensor."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for name, t in base.items():
        if t.is_floating_point():
            out[name] = (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def _assert_equal_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------------------- identities


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "dare_ties"])
def test_lambda_zero_returns_base_exactly(method: str) -> None:
    base = _base()
    models = [_derived(base, i) for i in range(3)]
    merged = merge_state_dicts(base, models, method, 0.0, density=0.5, drop_rate=0.5)
    _assert_equal_dicts(merged, base)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare"])
def test_one_model_lambda_one_returns_that_model_exactly(method: str) -> None:
    base = _base()
    model = _derived(base, 0)
    merged = merge_state_dicts(base, [model], method, 1.0, density=1.0, drop_rate=0.0)
    _assert_equal_dicts(merged, model)


def test_mean_form_equals_plain_average() -> None:
    base = _base()
    models = [_derived(base, i) for i in range(4)]
    merged = merge_state_dicts(base, models, "task_arithmetic", 1.0, mean=True)
    for name, t in base.items():
        if t.is_floating_point():
            average = (sum(m[name].double() for m in models) / 4).to(t.dtype)
            assert torch.equal(merged[name], average), name
    # The same through linear averaging, which never touches the base.
    linear = merge_state_dicts(None, models, "linear")
    for name in base:
        torch.testing.assert_close(linear[name], merged[name], rtol=0, atol=1e-7)


def test_task_arithmetic_formula_with_per_model_lambdas() -> None:
    base = _base()
    models = [_derived(base, i) for i in range(3)]
    lambdas = [0.2, -0.5, 1.5]
    merged = merge_state_dicts(base, models, "task_arithmetic", lambdas)
    name = "backbone.encoder.layer.0.weight"
    expected = base[name].double() + sum(lam * (m[name].double() - base[name].double()) for lam, m in zip(lambdas, models))
    assert torch.equal(merged[name], expected.float())
    # mean=True divides every λ_i by n.
    mean_merged = merge_state_dicts(base, models, "task_arithmetic", [3 * v for v in lambdas], mean=True)
    torch.testing.assert_close(mean_merged[name], merged[name], rtol=0, atol=1e-6)


def test_linear_weights_are_normalised() -> None:
    # No base: the relatedness check cannot apply and does not get in the way.
    a = {"w": torch.tensor([1.0, 2.0, 3.0])}
    b = {"w": torch.tensor([5.0, 6.0, -1.0])}
    merged = merge_state_dicts(None, [a, b], "linear", weights=[1.0, 3.0])
    assert torch.equal(merged["w"], torch.tensor([4.0, 5.0, 0.0]))


# ------------------------------------------------------------------------------------------- TIES by hand

TIES_BASE = torch.tensor([1.0, -1.0, 0.5, 2.0, 0.0, 3.0])
TIES_TAUS = [
    torch.tensor([3.0, -1.0, 2.0, 0.5, -4.0, 1.0]),  # top-3 |.|: 4, 3, 2 -> [3, 0, 2, 0, -4, 0]
    torch.tensor([-2.0, -2.5, 1.5, 0.5, 4.0, -3.0]),  # top-3: 4, 3, 2.5 -> [0, -2.5, 0, 0, 4, -3]
    torch.tensor([1.5, 3.0, -1.0, -0.5, 0.1, 2.0]),  # top-3: 3, 2, 1.5 -> [1.5, 3, 0, 0, 0, 2]
]
# Elected signs of the trimmed sums [4.5, 0.5, 2, 0, 0, -1]: +, +, +, 0 (nothing kept), 0 (exact tie -4 + 4), -.
# Disjoint means over agreeing models: [(3+1.5)/2, 3, 2, 0, 0, -3].
TIES_MERGED = torch.tensor([2.25, 3.0, 2.0, 0.0, 0.0, -3.0])


def _ties_inputs() -> tuple[dict, list[dict]]:
    base = {"w": TIES_BASE.clone()}
    return base, [{"w": TIES_BASE + tau} for tau in TIES_TAUS]


def test_ties_matches_hand_computation_including_sign_tie() -> None:
    base, models = _ties_inputs()
    merged = merge_state_dicts(base, models, "ties", 0.5, density=0.5, allow_unrelated=True)
    expected = TIES_BASE + 0.5 * TIES_MERGED
    assert torch.equal(merged["w"], expected)
    # Element 4 is an exact sign tie (-4 vs +4 after trimming): it stays at the base value.
    assert merged["w"][4].item() == TIES_BASE[4].item()


def test_ties_per_model_lambdas_enter_after_sign_election() -> None:
    base, models = _ties_inputs()
    lambdas = [1.0, 2.0, 0.5]
    merged = merge_state_dicts(base, models, "ties", lambdas, density=0.5, allow_unrelated=True)
    # Element 1: λ-weighted election would be 2*(-2.5) + 0.5*3 < 0, but the paper (and we) elect on unweighted
    # trimmed values (sum +0.5 -> '+'), so only model 3 agrees and contributes 0.5 * 3.
    delta = torch.tensor([(1.0 * 3 + 0.5 * 1.5) / 2, 0.5 * 3, 1.0 * 2, 0.0, 0.0, 2.0 * -3])
    assert torch.equal(merged["w"], TIES_BASE + delta)


def test_ties_trim_keeps_entries_tied_with_threshold() -> None:
    base = {"w": torch.full((4,), 100.0)}
    model = {"w": base["w"] + torch.tensor([2.0, -2.0, 2.0, 1.0])}
    # density 0.5 -> k = 2 but three entries tie at |2|; all three are kept, the 1.0 is trimmed.
    merged = merge_state_dicts(base, [model], "ties", 1.0, density=0.5)
    assert torch.equal(merged["w"], base["w"] + torch.tensor([2.0, -2.0, 2.0, 0.0]))


# ------------------------------------------------------------------------------------------- DARE


def test_dare_with_zero_drop_equals_task_arithmetic() -> None:
    base = _base()
    models = [_derived(base, i) for i in range(3)]
    dare = merge_state_dicts(base, models, "dare", 0.3, drop_rate=0.0, seed=5)
    ta = merge_state_dicts(base, models, "task_arithmetic", 0.3)
    _assert_equal_dicts(dare, ta)
    # dare_ties at drop 0 equals ties at density 1 (no trimming).
    _assert_equal_dicts(
        merge_state_dicts(base, models, "dare_ties", 0.7, drop_rate=0.0),
        merge_state_dicts(base, models, "ties", 0.7, density=1.0),
    )


def test_dare_is_seeded_and_independent_of_tensor_order() -> None:
    base = _base()
    models = [_derived(base, i) for i in range(2)]
    first = merge_state_dicts(base, models, "dare", 0.5, drop_rate=0.5, seed=3)
    again = merge_state_dicts(base, models, "dare", 0.5, drop_rate=0.5, seed=3)
    _assert_equal_dicts(first, again)
    reversed_base = dict(reversed(list(base.items())))
    reversed_models = [dict(reversed(list(m.items()))) for m in models]
    reordered = merge_state_dicts(reversed_base, reversed_models, "dare", 0.5, drop_rate=0.5, seed=3)
    for name in base:
        assert torch.equal(reordered[name], first[name]), name
    other = merge_state_dicts(base, models, "dare", 0.5, drop_rate=0.5, seed=4)
    assert not torch.equal(other["backbone.encoder.layer.0.weight"], first["backbone.encoder.layer.0.weight"])


def test_dare_preserves_task_vector_in_expectation() -> None:
    n = 200_000
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(n, generator=g)}
    tau = 0.01 + 0.002 * torch.randn(n, generator=g)
    model = {"w": base["w"] + tau}
    merged = merge_state_dicts(base, [model], "dare", 1.0, drop_rate=0.9, seed=0)
    dropped_tau = merged["w"].double() - base["w"].double()
    kept = dropped_tau.abs() > 1e-6
    assert abs(kept.double().mean().item() - 0.1) < 0.005  # Bernoulli(0.1) keep rate
    # Survivors are rescaled by 1/(1-p) = 10, so the mean task vector is preserved (±3 % with this n).
    assert dropped_tau.mean().item() == pytest.approx(tau.double().mean().item(), rel=0.03)
    torch.testing.assert_close(dropped_tau[kept], 10 * tau.double()[kept], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- dtypes, finiteness


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "dare_ties", "linear"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_come_back_in_their_dtype(method: str, dtype: torch.dtype) -> None:
    base = _base(dtype=dtype)
    models = [_derived(base, i) for i in range(3)]
    merged = merge_state_dicts(base if method != "linear" else None, models, method, None if method == "linear" else 0.4)
    for name, t in merged.items():
        assert t.dtype == base[name].dtype, name
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name
    assert torch.equal(merged["backbone.step"], base["backbone.step"])


def test_outputs_finite_for_large_lambdas() -> None:
    base = _base()
    models = [_derived(base, i) for i in range(4)]
    for method in ("task_arithmetic", "ties", "dare", "dare_ties"):
        merged = merge_state_dicts(base, models, method, 10.0, drop_rate=0.5)
        assert all(torch.isfinite(t).all() for t in merged.values() if t.is_floating_point()), method


# ------------------------------------------------------------------------------------------- validation


def test_shape_mismatch_names_the_tensor() -> None:
    base = _base()
    model = _derived(base, 0)
    model["backbone.encoder.layer.0.bias"] = torch.zeros(7)
    with pytest.raises(UserError, match=r"shape mismatch for 'backbone.encoder.layer.0.bias'.*\(7,\).*\(6,\)"):
        merge_state_dicts(base, [_derived(base, 1), model], "task_arithmetic", 0.2, model_labels=["a", "b"])


def test_missing_and_extra_keys_are_reported() -> None:
    base = _base()
    model = _derived(base, 0)
    del model["heads.final_proj.weight"]
    with pytest.raises(UserError, match=r"model 1 \(m1\).*missing 'heads.final_proj.weight'"):
        merge_state_dicts(base, [model], "task_arithmetic", 0.2, model_labels=["m1"])
    model = _derived(base, 0)
    model["extra.weight"] = torch.zeros(2)
    with pytest.raises(UserError, match=r"unexpected 'extra.weight'"):
        merge_state_dicts(base, [model], "ties", 1.0)


def test_nan_and_inf_are_reported_with_model_and_tensor() -> None:
    base = _base()
    bad = _derived(base, 1)
    bad["backbone.encoder.layer.0.weight"][2, 3] = float("nan")
    with pytest.raises(UserError, match=r"model 2 \(second\) has NaN/inf values in 'backbone.encoder.layer.0.weight'"):
        merge_state_dicts(base, [_derived(base, 0), bad], "task_arithmetic", 0.2, model_labels=["first", "second"])
    inf_base = _base()
    inf_base["heads.final_proj.weight"][0, 0] = float("inf")
    with pytest.raises(UserError, match=r"the base has NaN/inf values in 'heads.final_proj.weight'"):
        merge_state_dicts(inf_base, [_derived(_base(), 0)], "task_arithmetic", 0.2)


def test_unrelated_model_is_rejected_unless_allowed() -> None:
    base = _base(seed=0)
    unrelated = _base(seed=1)  # same architecture, different initialisation: ratio about sqrt(2)
    with pytest.raises(UserError, match=r"model 1 \(other\) does not look derived from the base.*--allow-unrelated"):
        merge_state_dicts(base, [unrelated], "task_arithmetic", 0.2, model_labels=["other"])
    _, report = merge_with_report(base, [unrelated], MergeOptions(lambdas=0.2, allow_unrelated=True), progress=False)
    assert 1.0 < report.task_vector_ratios[0] < 2.0
    _, related = merge_with_report(base, [_derived(base, 0)], MergeOptions(lambdas=0.2), progress=False)
    assert related.task_vector_ratios[0] < 0.2
    # The threshold is configurable.
    with pytest.raises(UserError, match="does not look derived"):
        merge_state_dicts(base, [_derived(base, 0)], "task_arithmetic", 0.2, max_task_vector_ratio=0.01)


def test_integer_buffers_must_match() -> None:
    base = _base()
    model = _derived(base, 0)
    model["backbone.step"] = torch.tensor([8])
    with pytest.raises(UserError, match=r"non-float tensor 'backbone.step' differs"):
        merge_state_dicts(base, [model], "task_arithmetic", 0.2)


def test_option_validation() -> None:
    base = _base()
    models = [_derived(base, i) for i in range(2)]
    with pytest.raises(ConfigError, match="already averages"):
        merge_state_dicts(base, models, "ties", 1.0, mean=True)
    with pytest.raises(ConfigError, match="got 3 lambdas for 2 models"):
        merge_state_dicts(base, models, "task_arithmetic", [0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="linear' takes weights"):
        merge_state_dicts(base, models, "linear", 0.5)
    with pytest.raises(ConfigError, match="drop_rate"):
        merge_state_dicts(base, models, "dare", 0.5, drop_rate=1.0)
    with pytest.raises(UserError, match="needs a base"):
        merge_state_dicts(None, models, "task_arithmetic", 0.5)


# ------------------------------------------------------------------------------------------- scope


def test_scope_exclusion_keeps_base_values() -> None:
    base = _base()
    models = [_derived(base, i) for i in range(2)]
    merged = merge_state_dicts(
        base, models, "task_arithmetic", 0.5, exclude=["backbone.feature_extractor.*", "heads.*"]
    )
    assert torch.equal(merged["backbone.feature_extractor.conv.weight"], base["backbone.feature_extractor.conv.weight"])
    assert torch.equal(merged["heads.final_proj.weight"], base["heads.final_proj.weight"])
    assert not torch.equal(merged["backbone.encoder.layer.0.weight"], base["backbone.encoder.layer.0.weight"])
    full = merge_state_dicts(base, models, "task_arithmetic", 0.5)
    assert torch.equal(merged["backbone.encoder.layer.0.weight"], full["backbone.encoder.layer.0.weight"])
    only = merge_state_dicts(base, models, "task_arithmetic", 0.5, include=["backbone.encoder.*"])
    assert torch.equal(only["heads.final_proj.weight"], base["heads.final_proj.weight"])
    assert torch.equal(only["backbone.encoder.layer.0.bias"], full["backbone.encoder.layer.0.bias"])


def test_pattern_that_matches_nothing_is_an_error() -> None:
    base = _base()
    with pytest.raises(UserError, match=r"--exclude pattern 'backbone.feature_extracter.\*' matches no parameter"):
        merge_state_dicts(base, [_derived(base, 0)], "task_arithmetic", 0.2, exclude=["backbone.feature_extracter.*"])


# ------------------------------------------------------------------------------------------- sweeps


def test_parse_lambda_range_and_format() -> None:
    values = parse_lambda_range("0.1:1.0:0.1")
    assert len(values) == 10 and values[0] == 0.1 and values[-1] == 1.0
    assert [format_lambda(v) for v in values[:3]] == ["0.1", "0.2", "0.3"]
    assert format_lambda(1.0) == "1" and format_lambda(0.0) == "0"
    assert parse_lambda_range("0.3,0.1") == [0.1, 0.3]
    with pytest.raises(ConfigError):
        parse_lambda_range("1:0:0.1")
    with pytest.raises(ConfigError):
        parse_lambda_range("a:b")


def test_select_best_lambda_ties_go_to_smallest() -> None:
    results = {0.2: {"a": {"m": 0.5}, "b": {"m": 0.7}}, 0.4: {"a": {"m": 0.7}, "b": {"m": 0.5}}, 0.6: {"a": {"m": 0.1}, "b": {"m": 0.2}}}
    best, means = select_best_lambda(results, "m")
    assert best == 0.2 and means[0.4] == pytest.approx(0.6)
    with pytest.raises(UserError, match="metric 'auc' missing for dataset 'a'"):
        select_best_lambda(results, "auc")


def test_sweep_with_fake_evaluator_picks_argmax_and_writes_report(tmp_path: Path) -> None:
    lambdas = parse_lambda_range("0.1:0.5:0.1")
    merged_at: list[float] = []

    def fake_merge(lam: float, target: Path) -> None:
        target.mkdir(parents=True)
        (target / "weights.txt").write_text(f"lambda={lam}\n")
        merged_at.append(lam)

    def fake_evaluate(model_dir: Path) -> dict:
        lam = float((model_dir / "weights.txt").read_text().split("=")[1])
        # Dataset 'x' peaks at 0.3, 'y' at 0.4 but flatter; the mean peaks at 0.3.
        return {
            "x": {"roc_auc": 0.9 - 2 * (lam - 0.3) ** 2, "ap": 0.5},
            "y": {"roc_auc": 0.8 - 0.5 * (lam - 0.4) ** 2, "ap": 0.4},
        }

    result = run_sweep(lambdas, tmp_path, fake_merge, fake_evaluate, "roc_auc", record={"method": "fake"})
    assert merged_at == lambdas
    expected_best = max(lambdas, key=lambda l: (0.9 - 2 * (l - 0.3) ** 2 + 0.8 - 0.5 * (l - 0.4) ** 2) / 2)
    assert result.selected_lambda == expected_best == 0.3

    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert len(rows) == 5 * (2 * 2 + 1)
    mean_rows = {r["lambda"]: float(r["value"]) for r in rows if r["dataset"] == "mean"}
    assert mean_rows["0.3"] == pytest.approx(max(mean_rows.values()))
    x_at_05 = [r for r in rows if r["lambda"] == "0.5" and r["dataset"] == "x" and r["metric"] == "roc_auc"]
    assert float(x_at_05[0]["value"]) == pytest.approx(0.9 - 2 * 0.04)

    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["selected_lambda"] == 0.3 and selection["split"] == "validation"
    assert selection["copied_from"] == "lambda_0.3" and selection["method"] == "fake"
    assert math.isclose(selection["per_dataset"]["x"], 0.9)
    selected = tmp_path / "selected" / "weights.txt"
    assert selected.is_file() and not selected.is_symlink() and not (tmp_path / "selected").is_symlink()
    assert selected.read_text() == "lambda=0.3\n"


# ------------------------------------------------------------------------------------------- end to end (tiny models)


def _tiny_exports(tmp_path: Path, n: int = 2, heads: tuple[bool, ...] | None = None) -> tuple[Path, list[Path], object]:
    """A tiny base export and ``n`` exports derived from it (small perturbations, base fingerprint recorded)."""
    import copy

    from culturemert.model import model_fingerprint, save_export
    from culturemert.model import build_model

    base = build_model("tiny", seed=0)
    base_dir = save_export(base, tmp_path / "base") or tmp_path / "base"
    base_fp = model_fingerprint(base)
    paths = []
    g = torch.Generator().manual_seed(7)
    for i in range(n):
        model = copy.deepcopy(base)
        if heads is not None and not heads[i]:
            model.heads = None
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        path = tmp_path / f"culture{i}"
        save_export(model, path, base_fingerprint=base_fp)
        paths.append(path)
    return Path(base_dir), paths, base


def test_cli_merge_end_to_end_matches_state_dict_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import transformers

    from culturemert.model import load_model, model_fingerprint, read_export_metadata
    from culturemert.cli import main

    base_dir, model_dirs, _ = _tiny_exports(tmp_path, n=2)
    out = tmp_path / "merged"
    code = main(
        ["merge", "--base", str(base_dir), "--models", *map(str, model_dirs), "--method", "ties", "--lambda", "0.8",
         "--density", "0.5", "--exclude", "backbone.feature_extractor.*", "--out", str(out)]
    )
    assert code == 0
    merged = load_model(str(out))
    base = load_model(str(base_dir))
    inputs = [load_model(str(d)) for d in model_dirs]
    expected = merge_state_dicts(
        base.state_dict(), [m.state_dict() for m in inputs], "ties", 0.8, density=0.5,
        exclude=["backbone.feature_extractor.*"],
    )
    got = merged.state_dict()
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    assert merged.heads is not None  # every input had heads and the scope includes them

    meta = read_export_metadata(out)
    record = meta["card"]["merge"]
    assert record["method"] == "ties" and record["lambdas"] == [0.8, 0.8]
    assert record["base"]["fingerprint"] == model_fingerprint(base) == meta["base_fingerprint"]
    assert [i["fingerprint"] for i in record["inputs"]] == [model_fingerprint(m) for m in inputs]
    assert record["fingerprint"] == model_fingerprint(merged) == meta["fingerprint"]
    assert record["scope"]["exclude"] == ["backbone.feature_extractor.*"] and record["scope"]["heads_merged"]

    plain = transformers.AutoModel.from_pretrained(out)
    plain_sd = plain.state_dict()
    for name, t in merged.backbone.state_dict().items():
        assert torch.equal(plain_sd[name], t), name


def test_cli_rejects_recorded_different_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from culturemert.model import save_export
    from culturemert.cli import main
    from culturemert.model import build_model

    base_dir, model_dirs, _ = _tiny_exports(tmp_path, n=1)
    other_base = tmp_path / "other_base"
    save_export(build_model("tiny", seed=1), other_base)
    out = tmp_path / "merged"
    args = ["merge", "--base", str(other_base), "--models", str(model_dirs[0]), "--lambda", "0.2", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "records that it was trained from a model with fingerprint" in err and "--allow-unrelated" in err
    assert not out.exists()
    # --allow-unrelated overrides both checks (the fingerprint and the ≈1.4 norm ratio of a different init).
    assert main([*args, "--allow-unrelated"]) == 0


def test_heads_are_dropped_when_an_input_lacks_them(tmp_path: Path) -> None:
    from culturemert.model import load_model
    from culturemert.merge import merge_models

    base_dir, model_dirs, _ = _tiny_exports(tmp_path, n=2, heads=(True, False))
    record = merge_models(base_dir, model_dirs, tmp_path / "out", lambdas=0.3)
    merged = load_model(str(tmp_path / "out"))
    assert merged.heads is None and not record["scope"]["heads_merged"]


def test_sweep_on_tiny_models_with_injected_evaluator(tmp_path: Path) -> None:
    from culturemert.model import load_model
    from culturemert.merge import sweep_merge

    base_dir, model_dirs, base = _tiny_exports(tmp_path, n=2)
    calls = []

    def evaluator(model_dir: Path, eval_config: object) -> dict:
        calls.append((model_dir.name, eval_config))
        model = load_model(str(model_dir))
        # Score = closeness of one weight to a target: a real function of the merged weights.
        distance = float((model.backbone.encoder.layer_norm.weight.detach() - 1.0).abs().mean())
        return {"toy": {"roc_auc": -abs(distance - 0.004), "ap": 0.0}}

    out = tmp_path / "sweep"
    result = sweep_merge(base_dir, model_dirs, [0.0, 0.5, 1.0], out, "eval.yaml", MergeOptions(), evaluator=evaluator)
    assert [c[0] for c in calls] == ["lambda_0", "lambda_0.5", "lambda_1"] and calls[0][1] == "eval.yaml"
    assert result.selected_lambda == max(result.mean_metric, key=result.mean_metric.get)
    selection = json.loads((out / "selection.json").read_text())
    assert selection["split"] == "validation" and selection["eval_config"] == "eval.yaml"
    selected = load_model(str(out / "selected"))
    chosen = load_model(str(out / f"lambda_{format_lambda(result.selected_lambda)}"))
    for name, t in chosen.state_dict().items():
        assert torch.equal(selected.state_dict()[name], t), name
    # λ = 0 reproduces the base through the whole export/load path.
    zero = load_model(str(out / "lambda_0"))
    for name, t in base.state_dict().items():
        assert torch.equal(zero.state_dict()[name], t), name


def test_cli_sweep_uses_evaluate_on_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sys
    import types

    from culturemert.cli import main

    base_dir, model_dirs, _ = _tiny_exports(tmp_path, n=2)
    seen = []

    def evaluate_on_validation(model_dir: Path, eval_config: str) -> dict:
        seen.append((Path(model_dir).name, eval_config))
        lam = float(Path(model_dir).name.split("_")[1])
        return {"a": {"roc_auc": 1 - abs(lam - 0.4)}, "b": {"roc_auc": 1 - abs(lam - 0.6)}}

    # The CLI's evaluator imports culturemert.evaluate.pipeline when the sweep runs; hand it this fake instead.
    fake = types.ModuleType("culturemert.evaluate.pipeline")
    fake.evaluate_on_validation = evaluate_on_validation  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "culturemert.evaluate.pipeline", fake)
    out = tmp_path / "sweep"
    base_args = ["merge", "--base", str(base_dir), "--models", *map(str, model_dirs), "--out", str(out)]
    assert main([*base_args, "--sweep", "0.2:0.8:0.2"]) == 2
    assert "--sweep needs --select-on" in capsys.readouterr().err
    assert main([*base_args, "--sweep", "0.2:0.8:0.2", "--select-on", "val.yaml", "--mean"]) == 0
    assert [s[0] for s in seen] == ["lambda_0.2", "lambda_0.4", "lambda_0.6", "lambda_0.8"]
    assert all(s[1] == "val.yaml" for s in seen)
    selection = json.loads((out / "selection.json").read_text())
    # Means: 0.2 -> 0.6, 0.4 -> 0.9, 0.6 -> 0.9, 0.8 -> 0.6: a tie between 0.4 and 0.6 goes to the smaller λ.
    assert selection["selected_lambda"] == 0.4 and selection["options"]["mean"] is True
    assert "selected λ=0.4" in capsys.readouterr().out
    from culturemert.model import read_export_metadata

    assert read_export_metadata(out / "selected")["card"]["merge"]["lambdas"] == [0.2, 0.2]  # 0.4 / 2 models


def test_cli_linear_without_base(tmp_path: Path) -> None:
    from culturemert.model import load_model
    from culturemert.cli import main

    _, model_dirs, _ = _tiny_exports(tmp_path, n=2)
    out = tmp_path / "avg"
    assert main(["merge", "--models", *map(str, model_dirs), "--method", "linear", "--weights", "1", "3", "--out", str(out)]) == 0
    a, b = (load_model(str(d)) for d in model_dirs)
    merged = load_model(str(out))
    name = "backbone.encoder.layers.0.attention.q_proj.weight"
    expected = (0.25 * a.state_dict()[name].double() + 0.75 * b.state_dict()[name].double()).float()
    assert torch.equal(merged.state_dict()[name], expected)
    from culturemert.model import model_fingerprint, read_export_metadata

    # No base given: the inputs agree on the base they record, so the average inherits it.
    assert read_export_metadata(out)["base_fingerprint"] == read_export_metadata(model_dirs[0])["base_fingerprint"]
    assert read_export_metadata(out)["card"]["merge"]["weights"] == [0.25, 0.75]
    assert model_fingerprint(merged) == read_export_metadata(out)["fingerprint"]


@pytest.mark.parametrize(
    "method, base_given, kwargs",
    [("task_arithmetic", True, {"lambdas": [0.3, 0.7, 0.2]}), ("ties", True, {"density": 0.5}),
     ("dare_ties", True, {"drop_rate": 0.5, "seed": 3}), ("linear", False, {})],
)
def test_lazy_export_inputs_merge_exactly_like_loaded_models(tmp_path: Path, method: str, base_given: bool, kwargs: dict) -> None:
    from culturemert.model import load_model
    from culturemert.merge import load_inputs, merge_loaded, open_inputs_lazily

    base_dir, model_dirs, _ = _tiny_exports(tmp_path, n=3)
    base_arg = base_dir if base_given else None
    options = MergeOptions(method=method, exclude=["backbone.masked_spec_embed"] if base_given else [], **kwargs)
    lazy = open_inputs_lazily(base_arg, model_dirs)
    eager = load_inputs(base_arg, model_dirs)
    assert lazy.lazy and not eager.lazy
    assert lazy.fingerprints == eager.fingerprints and lazy.base_fingerprint == eager.base_fingerprint
    record_lazy = merge_loaded(lazy, tmp_path / "lazy", options)
    record_eager = merge_loaded(eager, tmp_path / "eager", options)
    assert record_lazy == record_eager  # fingerprints, and task-vector ratios summed in the same order
    a, b = load_model(str(tmp_path / "lazy")).state_dict(), load_model(str(tmp_path / "eager")).state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lazy_safetensors_reads_exactly_and_reports_damage(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from culturemert.model import LazySafetensors
    from culturemert.errors import CheckpointError

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).to(torch.bfloat16)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    lazy = LazySafetensors(path, prefix="p.")
    assert sorted(lazy) == ["p.a", "p.b", "p.c"] and len(lazy) == 3
    for name, t in load_file(str(path)).items():
        assert lazy[f"p.{name}"].dtype == t.dtype and torch.equal(lazy[f"p.{name}"], t)
    data = path.read_bytes()
    path.write_bytes(data[:-8])  # truncated payload
    with pytest.raises(CheckpointError, match="truncated"):
        _ = [LazySafetensors(path)[k] for k in ("a", "b", "c")]
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        LazySafetensors(path)


def test_lazy_merge_refuses_a_modified_export(tmp_path: Path) -> None:
    from culturemert.errors import CheckpointError
    from culturemert.merge import merge_models

    base_dir, model_dirs, _ = _tiny_exports(tmp_path, n=2)
    weights = model_dirs[1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch for model.safetensors"):
        merge_models(base_dir, model_dirs, tmp_path / "out", lambdas=0.3)
    assert not (tmp_path / "out").exists()


def test_lazy_path_is_taken_only_when_it_equals_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from culturemert.model import can_open_lazily, load_model, model_fingerprint, save_export
    from culturemert.merge import merge_models

    base_dir, model_dirs, _ = _tiny_exports(tmp_path, n=2)
    assert can_open_lazily(base_dir) and all(can_open_lazily(d) for d in model_dirs)
    # a float16 export loads into a float32 model whose fingerprint is not the recorded one: load it eagerly
    half = tmp_path / "half"
    save_export(load_model(str(model_dirs[0])), half, base_fingerprint=model_fingerprint(load_model(str(base_dir))),
                dtype=torch.float16)
    assert not can_open_lazily(half)
    record = merge_models(base_dir, [half, model_dirs[1]], tmp_path / "out-half", lambdas=0.3)
    assert record["inputs"][0]["fingerprint"] == model_fingerprint(load_model(str(half)))
    # "~" is expanded on the lazy path as load_model does
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(model_dirs[0], tmp_path / "home-copy")
    assert can_open_lazily("~/home-copy")
    merge_models(base_dir, ["~/home-copy", model_dirs[1]], tmp_path / "out-home", lambdas=0.3)


@pytest.mark.parametrize(
    "header, message",
    [
        ([1, 2], "not a JSON object"),
        ({"a": {"dtype": "F32", "shape": [2]}}, "malformed header entry"),
        ({"a": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 8]}}, "which its shape does not"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "invalid shape or offsets"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "invalid shape or offsets"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "beyond the end of the file"),
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, "malformed header entry"),
    ],
)
def test_lazy_safetensors_rejects_hostile_headers_before_reading(tmp_path: Path, header: object, message: str) -> None:
    from culturemert.model import LazySafetensors
    from culturemert.errors import CheckpointError

    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 8)
    with pytest.raises(CheckpointError, match=message):
        LazySafetensors(path)


def test_models_for_different_sample_rates_are_refused_eager_and_lazy(tmp_path: Path) -> None:
    import copy

    from culturemert.errors import CheckpointError, UserError
    from culturemert.merge import merge_models
    from culturemert.merge.job import load_inputs
    from culturemert.model import model_fingerprint, save_export

    base_dir, model_dirs, base = _tiny_exports(tmp_path, n=1)
    v0 = copy.deepcopy(base)
    v0.sample_rate = 16_000  # a MERT-v0-style model: same shapes, another input rate
    with pytest.raises(CheckpointError, match="runs at 16000 Hz but its preprocessor_config says sampling_rate 24000"):
        save_export(v0, tmp_path / "v0", base_fingerprint=model_fingerprint(base))
    v0.preprocessor_config = {**v0.preprocessor_config, "sampling_rate": 16_000}
    save_export(v0, tmp_path / "v0", base_fingerprint=model_fingerprint(base))
    for call in (lambda: merge_models(base_dir, [model_dirs[0], tmp_path / "v0"], tmp_path / "out", lambdas=0.3),
                 lambda: load_inputs(base_dir, [model_dirs[0], tmp_path / "v0"])):
        with pytest.raises(UserError, match=r"v0 runs at 16000 Hz but .*base at 24000 Hz"):
            call()
    assert not (tmp_path / "out").exists()
