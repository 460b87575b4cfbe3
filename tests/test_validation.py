"""Validation while pre-training runs: points at the configured steps, exact resume, the forgetting alarm, the
per-culture training loss, best / last-good exports, the run figure, and the pretrain CLI around them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_fakes import CultureSource, culture_factory, make_prepared_dir  # noqa: E402
from test_train import tiny_recipe  # noqa: E402

from culturemert.errors import ConfigError
from culturemert.train import Trainer
from culturemert.train.validation import validation_points

OFFSETS = {"western": 0, "makam": 8}
MIXED = [{"western": 1, "makam": 1}, {"makam": 1}]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def validations(out: Path) -> list[dict]:
    return [r for r in records(out) if r.get("kind") == "validation"]


def card(export: Path) -> dict:
    return json.loads((export / "culturemert.json").read_text())["card"]


def weights(export: Path) -> dict[str, torch.Tensor]:
    return load_file(str(export / "model.safetensors"))


def validate(**changes) -> dict:
    spec = {"every_steps": 2, "crops_per_culture": 4, "batch_clips": 4, "max_overhead": 1.0,
            "forgetting": {"cultures": ["western"], "tolerance": 0.05}}
    spec.update(changes)
    return spec


class _Killed(Exception):
    """Stands for a SIGKILL: the run dies while fetching a batch, after writing everything before it."""


def killing_factory(kill_at: tuple[int, int] | None):
    make = culture_factory(MIXED, OFFSETS)

    def factory(recipe, stage, index):
        src = make(recipe, stage, index)
        if kill_at is not None and kill_at[0] == index:
            original = src.batch

            def batch(step):
                if step == kill_at[1]:
                    raise _Killed(f"killed at stage {index} step {step}")
                return original(step)

            src.batch = batch
        return src

    return factory


# ============================================================================================ points and resume
def test_validation_points_are_stage_starts_ends_and_every_n():
    assert validation_points([3, 5], 2) == [0, 2, 3, 4, 6, 8]
    assert validation_points([3, 5], None) == [0, 3, 8]
    assert validation_points([4], 4) == [0, 4]


def test_validation_points_at_the_configured_steps_identical_after_kills_and_resume(tmp_path):
    recipe = tiny_recipe(validate=validate(), **{"checkpoint.every_steps": 4})
    Trainer(recipe, tmp_path / "full", source_factory=killing_factory(None)).run()
    full = validations(tmp_path / "full")
    assert [r["global_step"] for r in full] == [0, 2, 3, 4, 6, 8] == validation_points([3, 5], 2)
    assert [r["stage"] for r in full] == ["input"] * 3 + ["full"] * 3
    assert all(set(r["cultures"]) == {"makam", "western"} for r in full)
    assert all(r["cultures"]["makam"]["crops"] == 4 for r in full)

    run = tmp_path / "run"
    # killed before the first checkpoint (a fresh start must not keep the dead run's step-0 point), then after the
    # checkpoint at step 4 with points past it on disk (the resume cuts them and redoes them)
    for kill_at in ((0, 2), (1, 3)):
        with pytest.raises(_Killed):
            Trainer(recipe, run, source_factory=killing_factory(kill_at)).run()
    assert [r["global_step"] for r in validations(run)] == [0, 2, 3, 4, 6]
    Trainer(recipe, run, source_factory=killing_factory(None)).run()
    resumed = validations(run)
    assert [r["global_step"] for r in resumed] == [r["global_step"] for r in full]
    # identical numbers (CPU, same crops and masks, bit-identical weights), timing aside
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed] == strip
    assert card(run / "exports" / "best")["validation"] == card(tmp_path / "full" / "exports" / "best")["validation"]


# ============================================================================================ forgetting alarm
def _alarm_recipe(action: str, tolerance: float = 0.05):
    # stage 1 learns western's labelling; stage 2 trains only on makam (the same audio, labels shifted by 8) at a
    # high learning rate, which pulls western's predictions away
    return tiny_recipe(validate=validate(forgetting={"cultures": ["western"], "tolerance": tolerance, "action": action}),
                       **{"stages.0.steps": 6, "stages.0.trainable": ["all"],
                          "stages.0.lr": {"peak": 5e-3, "warmup_steps": 2},
                          "stages.1.steps": 4, "stages.1.lr": {"kind": "constant", "peak": 1e-2},
                          "objective.mixture_prob": 1.0, "checkpoint.every_steps": 100})


ALARM_MIXES = [{"western": 1}, {"makam": 1}]


def test_forgetting_alarm_fires_when_a_stage_trains_only_on_another_culture(tmp_path):
    Trainer(_alarm_recipe("warn"), tmp_path, source_factory=culture_factory(ALARM_MIXES, OFFSETS)).run()
    points = {r["global_step"]: r for r in validations(tmp_path)}
    start2 = points[6]["cultures"]["western"]["loss"]  # stage 1's end is stage 2's start
    assert points[8]["limits"] == {"western": pytest.approx(start2 * 1.05)}
    alarms = [r for r in records(tmp_path) if r.get("event") == "forgetting"]
    assert alarms, "western's loss rose but no alarm"
    for a in alarms:
        assert a["culture"] == "western" and a["stage"] == "full" and a["reference"] == pytest.approx(start2)
        assert a["value"] == points[a["global_step"]]["cultures"]["western"]["loss"] > start2 * 1.05
    # no alarm in stage 1, where western was trained (its loss fell)
    assert points[6]["cultures"]["western"]["loss"] < points[0]["cultures"]["western"]["loss"]
    assert (tmp_path / "exports" / "final").is_dir()  # warn only: the run goes on


def test_forgetting_alarm_with_stop_keeps_the_last_good_export(tmp_path):
    trainer = Trainer(_alarm_recipe("stop"), tmp_path, source_factory=culture_factory(ALARM_MIXES, OFFSETS))
    result = trainer.run()
    exports = tmp_path / "exports"
    assert result == exports / "last-good" and trainer.stopped is not None
    assert not (exports / "final").exists() and not (exports / "stage-2-full").exists()
    stop = [r for r in records(tmp_path) if r.get("event") == "stop"]
    assert len(stop) == 1 and stop[0]["global_step"] == 8  # the first point of stage 2
    # the last point within tolerance is stage 2's start = stage 1's end: the same weights as that export
    good = card(exports / "last-good")
    assert good["selection"].startswith("last good") and good["validation"]["global_step"] == 6
    a, b = weights(exports / "last-good"), weights(exports / "stage-1-input")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_forgetting_culture_without_held_out_crops_fails_before_compute(tmp_path):
    recipe = tiny_recipe(validate=validate(forgetting={"cultures": ["greek"], "tolerance": 0.1}))
    with pytest.raises(ConfigError, match="validate.forgetting.cultures: 'greek' has no held-out crops"):
        Trainer(recipe, tmp_path, source_factory=culture_factory(MIXED, OFFSETS)).run()
    assert not (tmp_path / "checkpoints").exists()


def test_validation_cost_over_the_bound_fails_before_compute(tmp_path):
    recipe = tiny_recipe(validate=validate(max_overhead=0.05))
    with pytest.raises(ConfigError, match=r"validate: 8 held-out crops at 6 points cost about 50\.0 %"):
        Trainer(recipe, tmp_path, source_factory=culture_factory(MIXED, OFFSETS)).run()


def test_a_source_without_held_out_data_runs_without_validation_and_says_so(tmp_path, caplog):
    from _train_fakes import factory

    Trainer(tiny_recipe(validate=validate()), tmp_path, source_factory=factory()).run()
    assert "validation: off (the batch source provides no held-out data)" in caplog.text
    assert not validations(tmp_path) and not (tmp_path / "exports" / "best").exists()
    assert card(tmp_path / "exports" / "final")["validation"].startswith("none")


# ============================================================================================ best / per culture
def test_best_export_has_the_lowest_new_mean_and_the_cards_say_which_is_which(tmp_path):
    Trainer(tiny_recipe(validate=validate()), tmp_path, source_factory=culture_factory(MIXED, OFFSETS)).run()
    points = validations(tmp_path)
    best = min(points, key=lambda r: r["new_mean"])  # first minimum: later equal values do not replace it
    assert all(r["new_mean"] == r["cultures"]["makam"]["loss"] for r in points)  # new = makam (western protected)
    best_card, final_card = card(tmp_path / "exports" / "best"), card(tmp_path / "exports" / "final")
    assert best_card["validation"]["global_step"] == best["global_step"]
    assert best_card["selection"].startswith("best:") and final_card["selection"].startswith("final:")
    assert f"global step {best['global_step']}" in final_card["selection"]
    assert final_card["validation"]["global_step"] == 8
    readme = (tmp_path / "exports" / "best" / "README.md").read_text()
    assert "| makam |" in readme and "best:" in readme


def test_per_culture_training_loss_recombines_into_the_batch_loss(tmp_path):
    recipe = tiny_recipe(validate=None, **{"objective.feature_penalty_weight": 0.0})
    Trainer(recipe, tmp_path, source_factory=culture_factory(MIXED, OFFSETS)).run()
    steps = [r for r in records(tmp_path) if "loss" in r]
    assert len(steps) == 8
    for r in steps:
        # every row has the same masked-frame count (require_same_masks), so clip-weighted = frame-weighted
        n = r["culture_clips"]
        assert sum(n.values()) == 4 and set(r["culture_loss"]) == {c for c, k in n.items() if k}
        mixed = sum(n[c] * r["culture_loss"][c] for c in r["culture_loss"]) / sum(n.values())
        assert mixed == pytest.approx(r["loss"], rel=1e-5)
    assert {c for r in steps if r["stage"] == "full" for c in r["culture_loss"]} == {"makam"}


def test_objective_row_sums_equal_single_row_losses():
    from culturemert.model import build_model
    from culturemert.objective import MertObjective, ObjectiveConfig
    from culturemert.teachers import MertCQT

    model = build_model("tiny", seed=0, n_codebooks=2, codebook_size=16).eval()
    objective = MertObjective(ObjectiveConfig(require_same_masks=False), MertCQT(fft_frames=300))
    src = CultureSource(3, 24000, mixture={"western": 1}, offsets=OFFSETS)
    batch = src.batch(0)
    wav, codes = torch.as_tensor(batch["wav"]), torch.as_tensor(batch["codes"])
    _, mask, _ = objective.plan(wav, model.num_frames(wav.shape[1]), codes.shape[2], torch.Generator().manual_seed(1),
                                train=False)
    with torch.no_grad():
        out = objective(model, wav, wav, codes, mask)
        for i in range(3):
            one = objective(model, wav[i : i + 1], wav[i : i + 1], codes[i : i + 1], mask[i : i + 1])
            m = out.rows["masked"][i]
            assert m == mask[i].sum()
            assert float(out.rows["pred_sum"][i] / m) == pytest.approx(float(one.parts["pred_loss"]), rel=1e-4)
            assert float(out.rows["cqt_sum"][i] / m) == pytest.approx(float(one.parts["cqt_mse"]), rel=1e-4)
    assert float(out.rows["pred_sum"].sum() / out.rows["masked"].sum()) == pytest.approx(float(out.parts["pred_loss"]), rel=1e-5)


# ============================================================================================ curves
def test_ema_is_the_bias_corrected_average():
    from culturemert.train.curves import ema, ema_alpha

    xs = [2.0, 1.0, 4.0]
    a = 0.5
    s1 = (1 - a) * 2.0
    s2 = a * s1 + (1 - a) * 1.0
    s3 = a * s2 + (1 - a) * 4.0
    assert ema(xs, a) == pytest.approx([s1 / (1 - a), s2 / (1 - a**2), s3 / (1 - a**3)])
    assert ema(xs, 0.0) == xs
    assert ema_alpha(10) == 0.0 and ema_alpha(400) == pytest.approx(1 - 1 / 20) and ema_alpha(10**6) == pytest.approx(1 - 1 / 200)


def test_run_figure_has_per_culture_training_and_validation_series(tmp_path):
    from culturemert.train.curves import read_run

    Trainer(_alarm_recipe("warn"), tmp_path, source_factory=culture_factory(ALARM_MIXES, OFFSETS)).run()
    run = read_run(tmp_path / "metrics.jsonl")
    assert set(run["train"]) == {"western", "makam"}
    assert run["train"]["western"][0] == list(range(1, 7)) and run["train"]["makam"][0] == list(range(7, 11))
    assert run["stages"] == {"input": 0, "full": 6}
    assert len(run["lr"][0]) == 10 and run["alarms"]
    png = tmp_path / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


# ============================================================================================ CLI
@pytest.fixture(scope="module")
def prepared_with_valid(tmp_path_factory):
    return make_prepared_dir(tmp_path_factory.mktemp("prepv"), files_per_culture=3, valid_files=1)


def test_pretrain_check_reports_the_validation_set_by_shipped_name(prepared_with_valid, tmp_path, capsys):
    from culturemert.cli import main

    forgetting = "validate.forgetting={cultures: [western], tolerance: 0.05}"
    assert main(["pretrain", "tiny-test", f"data.dirs=[{prepared_with_valid}]", forgetting, "--check"]) == 0
    out = capsys.readouterr().out
    assert "tiny-test.yaml: ok (2 stage(s), 8 steps)" in out
    assert "data: 1 dir(s), teacher level-zc (2 x 16), split 'train': makam 0.1 min, western 0.1 min" in out
    assert "validation: split 'valid', 4 crops x 1 s per culture (4 s), every 4 steps + stage starts/ends = 4 points" in out
    assert "  makam: 4 crops (4 s) from 0.1 min of held-out audio" in out and "  western: 4 crops" in out
    assert "forgetting alarm: western, tolerance 5 % of the stage's starting value, action warn" in out
    assert "best export: mean loss over makam" in out
    assert not (tmp_path / "o").exists()


def test_pretrain_check_says_when_the_data_has_no_held_out_split(tmp_path, capsys):
    from culturemert.cli import main

    prepared = make_prepared_dir(tmp_path / "prep")
    assert main(["pretrain", "tiny-test", f"data.dirs=[{prepared}]", "--check"]) == 0
    out = capsys.readouterr().out
    assert "validation: off (no held-out crops in split 'valid' (makam: no items in split 'valid'; western: " in out
    # naming a protected culture that cannot be validated is an error, not a silent off
    forgetting = "validate.forgetting={cultures: [western], tolerance: 0.05}"
    assert main(["pretrain", "tiny-test", f"data.dirs=[{prepared}]", forgetting, "--check"]) == 2
    assert "validate.forgetting.cultures: 'western' has no held-out crops (no items in split 'valid')" in capsys.readouterr().err


def test_pretrain_unknown_recipe_name_lists_the_shipped_ones(capsys):
    from culturemert.cli import main

    assert main(["pretrain", "culturemert-96m", "--check"]) == 2
    err = capsys.readouterr().err
    assert "recipe not found: culturemert-96m" in err and "culturemert-95m" in err and "quickstart/cpt" in err
    from culturemert.train import resolve_recipe, shipped_recipes

    # the pre-package path of a recipe still finds it; an existing file wins over a shipped name
    assert resolve_recipe("recipes/culturemert-95m.yaml") == shipped_recipes()["culturemert-95m"]
    assert main(["pretrain", "--list"]) == 0
    assert "quickstart/single-culture" in capsys.readouterr().out
    assert main(["--version"]) == 0
    from culturemert import __version__

    assert capsys.readouterr().out.strip() == f"culturemert {__version__}"


def test_pretrain_cli_with_prepared_valid_split_validates_and_plots(prepared_with_valid, tmp_path):
    from culturemert.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "tiny-test", f"data.dirs=[{prepared_with_valid}]", "--out", str(out)]) == 0
    points = validations(out)
    assert [r["global_step"] for r in points] == [0, 3, 4, 8]
    for r in points:
        for m in r["cultures"].values():
            assert m["crops"] == 4 and 0 <= m["acc"] <= 1 and m["cqt_mse"] > 0
            assert m["pred_loss"] == pytest.approx(m["ce_0"] + m["ce_1"])
            assert m["loss"] == pytest.approx(m["pred_loss"] + m["cqt_mse"])  # weights 1, feature penalty excluded
    summary = json.loads((out / "validation.json").read_text())
    assert summary["protected"] == [] and summary["new"] == ["makam", "western"] and summary["last"]["global_step"] == 8
    assert (out / "exports" / "best").is_dir() and math.isfinite(summary["best"]["value"])


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    from culturemert.train import resolve_recipe, shipped_recipes

    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("tiny-test") == shipped_recipes()["tiny-test"]
    (tmp_path / "tiny-test").write_text("name: mine\n")
    assert resolve_recipe("tiny-test") == Path("tiny-test")
