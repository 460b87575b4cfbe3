"""Label-free selection of merge method and λ by held-out masked-prediction loss, and the merge-vs-mix report."""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from culturemert.errors import DataError
from culturemert.merge.select import Candidate, HeldOutLoss, select_candidate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_fakes import make_prepared_dir  # noqa: E402

SMALL = dict(crops_per_culture=4, batch_clips=2, crop_seconds=1.0, seed=3)


def _exports(tmp_path: Path, n: int = 2, scale: float = 0.05, **heads) -> tuple[Path, list[Path]]:
    from culturemert.model import build_model, model_fingerprint, save_export

    base = build_model("tiny", seed=0, **heads)
    save_export(base, tmp_path / "base")
    fp = model_fingerprint(base)
    g = torch.Generator().manual_seed(11)
    paths = []
    for i in range(n):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g) * (p.detach().abs().mean() + 1e-3))
        save_export(model, tmp_path / f"single{i}", base_fingerprint=fp)
        paths.append(tmp_path / f"single{i}")
    return tmp_path / "base", paths


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return make_prepared_dir(tmp_path_factory.mktemp("prep"), files_per_culture=3, valid_files=1)


def test_heldout_loss_equals_the_trainers_validation(tmp_path, prepared):
    from culturemert.data import PreparedDataset
    from culturemert.label_grid import crop_samples
    from culturemert.model import load_model
    from culturemert.objective import MertObjective, ObjectiveConfig
    from culturemert.teachers import MertCQT
    from culturemert.train.validation import evaluate_validation_set, prepared_validation_set, validation_seed

    base, (model_dir, _) = _exports(tmp_path)
    got = HeldOutLoss([prepared], **SMALL)(model_dir)
    vset = prepared_validation_set([PreparedDataset(prepared)], split="valid", crops_per_culture=4, batch_clips=2,
                                   crop_samples=crop_samples(1.0), seed=validation_seed(3))
    want = evaluate_validation_set(load_model(str(model_dir)), MertObjective(ObjectiveConfig(), MertCQT()), vset)
    assert set(got) == set(want) == {"western", "makam"}
    for culture in want:
        for key in ("pred_loss", "loss", "acc", "ce_0", "ce_1"):
            assert got[culture][key] == pytest.approx(want[culture][key], rel=1e-9, abs=1e-12), (culture, key)
        assert got[culture]["pred_loss"] == pytest.approx(got[culture]["ce_0"] + got[culture]["ce_1"])
    # a different model gives different numbers (the evaluator really runs the model it is given)
    assert HeldOutLoss([prepared], **SMALL)(base)["makam"]["pred_loss"] != got["makam"]["pred_loss"]


def _cand(method: str, lam: float, western: float, makam: float, turkish: float) -> Candidate:
    ssl = {"western": {"pred_loss": western}, "makam": {"pred_loss": makam}, "turkish": {"pred_loss": turkish}}
    return Candidate(method, lam, Path(f"{method}/{lam}"), ssl=ssl)


def test_constraint_excludes_a_candidate_whose_protected_loss_rises_too_much():
    base = {"western": {"pred_loss": 2.0}, "makam": {"pred_loss": 3.0}, "turkish": {"pred_loss": 3.0}}
    best_but_forgets = _cand("ties", 1.0, 2.0 + 0.051, 1.0, 1.0)  # mean new 1.0, western +0.051
    nan_western = _cand("tsv", 1.0, math.nan, 0.5, 0.5)
    ok = _cand("task_arithmetic", 0.5, 2.0 + 0.049, 2.0, 2.2)  # mean new 2.1, western +0.049
    chosen = select_candidate([best_but_forgets, nan_western, ok], select_on="ssl-loss", base_ssl=base,
                              protected="western", max_protected_increase=0.05)
    assert chosen is ok
    assert not best_but_forgets.admissible and not nan_western.admissible and ok.admissible
    assert best_but_forgets.protected_increase == pytest.approx(0.051)
    assert ok.objective == pytest.approx(2.1)  # the protected culture is not in the objective
    # without the constraint the forgetting merge wins; with a tighter one nothing is admissible
    assert select_candidate([best_but_forgets, ok], select_on="ssl-loss", base_ssl=base, protected=None,
                            max_protected_increase=0.05) is best_but_forgets
    assert select_candidate([best_but_forgets, ok], select_on="ssl-loss", base_ssl=base, protected="western",
                            max_protected_increase=0.01) is None


def test_selection_is_the_argmin_over_method_and_lambda_among_admissible():
    base = {"western": {"pred_loss": 2.0}, "makam": {"pred_loss": 3.0}, "turkish": {"pred_loss": 3.0}}
    g = torch.Generator().manual_seed(0)
    cands = []
    for method in ("task_arithmetic", "ties", "tsv", "iso_c"):
        for lam in (0.25, 0.5, 1.0):
            w, m, t = (2.0 + 0.1 * torch.rand(1, generator=g).item(), 1 + torch.rand(1, generator=g).item(),
                       1 + torch.rand(1, generator=g).item())
            cands.append(_cand(method, lam, w, m, t))
    cands.append(_cand("della", 0.5, 2.0, cands[0].ssl["makam"]["pred_loss"], cands[0].ssl["turkish"]["pred_loss"]))
    chosen = select_candidate(cands, select_on="ssl-loss", base_ssl=base, protected="western",
                              max_protected_increase=0.05)
    admissible = [c for c in cands if c.ssl["western"]["pred_loss"] - 2.0 <= 0.05]
    expected = min(admissible, key=lambda c: ((c.ssl["makam"]["pred_loss"] + c.ssl["turkish"]["pred_loss"]) / 2, c.lam))
    assert 0 < len(admissible) < len(cands)
    assert (chosen.method, chosen.lam) == (expected.method, expected.lam)


def _cli(tmp_path, base, models, prepared_dirs, *extra):
    from culturemert.cli import main

    out = tmp_path / "sweep"
    args = ["merge", "--base", str(base), "--models", *map(str, models), "--sweep", "0.5,1", "--out", str(out),
            "--select-on", "ssl-loss", "--prepared", *map(str, prepared_dirs), "--heldout-crops", "4",
            "--crop-seconds", "1", *extra]
    return main(args), out


def test_cli_ssl_loss_sweep_end_to_end(tmp_path, prepared, capsys):
    from culturemert.model import read_export_metadata

    base, models = _exports(tmp_path)
    mix = models[0]  # stands in for the multi-culture model: any model with the same heads
    code, out = _cli(tmp_path, base, models, [prepared], "--methods", "task_arithmetic", "ties", "--protected",
                     "western", "--max-protected-increase", "100", "--mix", str(mix))
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["method"], r["lambda"]) for r in rows] == [("task_arithmetic", "0.5"), ("task_arithmetic", "1"),
                                                          ("ties", "0.5"), ("ties", "1")]
    held_out = HeldOutLoss([prepared], crops_per_culture=4, crop_seconds=1.0)
    base_w = held_out(base)["western"]["pred_loss"]
    for r in rows:
        scores = held_out(out / r["method"] / f"lambda_{r['lambda']}")
        assert float(r["ssl_pred_loss_makam"]) == pytest.approx(scores["makam"]["pred_loss"], rel=1e-9)
        assert float(r["objective"]) == pytest.approx(scores["makam"]["pred_loss"], rel=1e-9)  # the only new culture
        assert float(r["protected_increase"]) == pytest.approx(scores["western"]["pred_loss"] - base_w, rel=1e-9)
    best = min(rows, key=lambda r: (float(r["objective"]), float(r["lambda"])))
    selection = json.loads((out / "selection.json").read_text())
    assert (selection["method"], selection["lambda"]) == (best["method"], float(best["lambda"]))
    assert [r["selected"] for r in rows].count("1") == 1 and best["selected"] == "1"
    card = read_export_metadata(out / "selected")["card"]
    assert card["selection"]["method"] == best["method"] and card["selection"]["lambda"] == float(best["lambda"])
    assert card["merge"]["method"] == best["method"] and card["merge"]["lambdas"] == [float(best["lambda"])] * 2
    assert card["selection"]["constraint"].startswith("western held-out pred_loss at most 100")
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "merge_vs_mix.md").read_text()
    for row in ("| base |", "| multi-culture |", "| merged-task_arithmetic |", "| merged-ties |"):
        assert row in report
    mix_row = next(r for r in csv.DictReader((out / "merge_vs_mix.csv").open()) if r["model"] == "multi-culture")
    assert float(mix_row["makam"]) == pytest.approx(held_out(mix)["makam"]["pred_loss"], rel=1e-9)
    assert (out / "merge_vs_mix.png").is_file()
    assert f"selected {best['method']} λ={best['lambda']}" in capsys.readouterr().out


def test_cli_constraint_that_nothing_meets_is_a_one_line_error(tmp_path, prepared, capsys):
    base, models = _exports(tmp_path, scale=0.5)
    code, out = _cli(tmp_path, base, models, [prepared], "--protected", "western", "--max-protected-increase", "0",
                     "--mix", str(models[0]))
    err = capsys.readouterr().err.strip()
    rows = list(csv.DictReader((out / "sweep.csv").open()))  # written before the error, to show why
    assert len(rows) == 2 and all(float(r["protected_increase"]) > 0 for r in rows)  # large random task vectors
    assert code == 2 and "no merge satisfies the constraint" in err and len(err.splitlines()) == 1
    assert not (out / "selected").exists()
    # the merge-vs-mix table still shows the method, at its smallest protected rise, marked as over the limit
    lam = min(rows, key=lambda r: float(r["protected_increase"]))["lambda"]
    assert f"| merged-task_arithmetic (over the limit) | {lam} |" in (out / "merge_vs_mix.md").read_text()


def test_cli_errors_on_missing_valid_split_and_teacher_mismatch(tmp_path, prepared, capsys):
    no_valid = make_prepared_dir(tmp_path / "novalid", files_per_culture=1)
    base, models = _exports(tmp_path / "a")
    code, _ = _cli(tmp_path, base, models, [no_valid])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no items in split 'valid'" in err and str(no_valid) in err and len(err.splitlines()) == 1
    base32, models32 = _exports(tmp_path / "b", codebook_size=32)
    code, _ = _cli(tmp_path / "b", base32, models32, [prepared])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "heads predict 2 codebooks of 32 codes" in err and "wrote 2 of 16" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(DataError, match="no items in split 'valid'"):
        HeldOutLoss([no_valid])


def test_cli_protected_options_need_their_partners(tmp_path, capsys):
    from culturemert.cli import main

    base, models = _exports(tmp_path)
    common = ["merge", "--base", str(base), "--models", *map(str, models), "--out", str(tmp_path / "o")]
    assert main([*common, "--sweep", "0.5", "--select-on", "ssl-loss"]) == 2
    assert "--select-on ssl-loss needs --prepared" in capsys.readouterr().err
    assert main([*common, "--sweep", "0.5", "--select-on", "e.yaml", "--methods", "ties", "--protected", "x"]) == 2
    assert "--protected needs --prepared" in capsys.readouterr().err
    assert main([*common, "--lambda", "0.5", "--methods", "ties"]) == 2
    assert "--methods only applies with --sweep" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_probe_selection_shows_both_criteria(tmp_path, prepared, monkeypatch, capsys):
    import types

    from culturemert.cli import main

    base, models = _exports(tmp_path)
    seen = []

    def evaluate_on_validation(model_dir, eval_config):
        seen.append(Path(model_dir).relative_to(tmp_path / "sweep").as_posix())
        lam = float(Path(model_dir).name.split("_")[1])
        bonus = 0.1 if Path(model_dir).parent.name == "ties" else 0.0
        return {"tags": {"roc_auc": 0.5 + bonus - abs(lam - 1.0)}}

    fake = types.ModuleType("culturemert.evaluate.pipeline")
    fake.evaluate_on_validation = evaluate_on_validation  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "culturemert.evaluate.pipeline", fake)
    out = tmp_path / "sweep"
    code = main(["merge", "--base", str(base), "--models", *map(str, models), "--sweep", "0.5,1", "--out", str(out),
                 "--select-on", "val.yaml", "--methods", "task_arithmetic", "ties", "--prepared", str(prepared),
                 "--heldout-crops", "4", "--crop-seconds", "1"])
    assert code == 0, capsys.readouterr().err
    assert seen == ["task_arithmetic/lambda_0.5", "task_arithmetic/lambda_1", "ties/lambda_0.5", "ties/lambda_1"]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert all(r["ssl_pred_loss_makam"] and r["ssl_pred_loss_western"] and r["probe_roc_auc_tags"] for r in rows)
    selection = json.loads((out / "selection.json").read_text())
    assert (selection["method"], selection["lambda"], selection["select_on"]) == ("ties", 1.0, "probe")
