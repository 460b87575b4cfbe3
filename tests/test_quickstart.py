"""The quickstart end to end at smoke size: every stage runs through the public API and the report is complete."""

from __future__ import annotations

import json

import pytest

import sys
from pathlib import Path

import torch

from culturemert.cli import main as cli_main
from culturemert.errors import ConfigError
from culturemert.quickstart import QUICKSTART_RECIPES, QuickstartConfig, build_tasks, check_inputs, heldout_masked_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_fakes import make_prepared_dir  # noqa: E402

pytestmark = pytest.mark.slow

SMOKE = {
    "pieces_per_culture": {"chinese": 24, "german": 40, "irish": 24},
    "duration_s": 6.0,
    "retrain_base": True,
    "base_steps": 4,
    "cpt_steps_scale": 0.04,
    "kmeans_clusters": 16,
    "kmeans_fit_seconds": 60,
    "merge_lambdas": [0.5, 1.0],
    "probe_seeds": 2,
    "probe_max_epochs": 3,
    "probe_hidden": 16,
    "heldout_crops": 8,
    "validation_crops": 4,
    "task_top_n": 4,
}


def test_quickstart_smoke_end_to_end(tmp_path, monkeypatch):
    cfg = tmp_path / "qs.yaml"
    cfg.write_text(json.dumps(SMOKE))  # JSON is YAML
    out = tmp_path / "qs"
    assert cli_main(["quickstart", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    report = (out / "quickstart.md").read_text()
    for model in ("base", "control", "cpt", "merged-ta", "baseline:logmel"):
        assert f"| {model} |" in report, model
    heldout = json.loads((out / "heldout_loss.json").read_text())
    methods = {f"merged-{m}" for m in QuickstartConfig().merge_methods}
    assert set(heldout) == {"base", "control", "cpt", "merged-ta", *methods}
    for name in methods:
        assert f"| {name} (λ = " in report, name
    assert "| multi-culture |" in (out / "merge-methods" / "merge_vs_mix.md").read_text()
    assert set(heldout["cpt"]) == {"german", "chinese", "irish"}
    # the runs validated while training, and the report shows their curves
    for run in ("cpt", "control"):
        assert (out / "runs" / run / "loss_curve.png").is_file()
        summary = json.loads((out / "runs" / run / "validation.json").read_text())
        assert set(summary["cultures"]) == {"german", "chinese", "irish"} and summary["protected"] == ["german"]
    assert "![cpt run](runs/cpt/loss_curve.png)" in report and "forgetting alarms (german)" in report
    selection = json.loads((out / "merge-sweep" / "selection.json").read_text())
    assert selection["selected_lambda"] in (0.5, 1.0)
    # the merged model records both inputs and the base it was merged on
    card = json.loads((out / "models" / "merged-ta" / "culturemert.json").read_text())
    assert card["base_fingerprint"] == json.loads((out / "models" / "base" / "culturemert.json").read_text())["fingerprint"]
    # a re-run resumes: nothing is retrained (the exports are reused as they are)
    before = (out / "models" / "cpt" / "model.safetensors").stat().st_mtime_ns
    assert cli_main(["quickstart", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert (out / "models" / "cpt" / "model.safetensors").stat().st_mtime_ns == before


def test_tasks_use_train_split_vocabulary_and_piece_level_splits(tmp_path):
    audio = tmp_path / "a.flac"
    audio.write_bytes(b"")
    rows = ["path,culture,split,tags"]
    for i in range(12):
        split = ["train", "train", "train", "valid", "test"][i % 5] if i < 10 else "test"
        tags = f"culture--irish|tune_type--{'reel' if i % 2 else 'jig'}|meter--{'2/2' if i % 2 else '6/8'}|subregion--x"
        rows.append(f"a.flac,irish,{split},{tags}")
    for i in range(6):
        rows.append(f"a.flac,german,{['train', 'train', 'train', 'valid', 'test', 'test'][i]},culture--german|mode--major")
    (tmp_path / "corpus.csv").write_text("\n".join(rows) + "\n")
    tasks = {t["name"]: t for t in build_tasks(tmp_path / "corpus.csv", tmp_path / "tasks", top_n=3)}
    assert tasks["culture"]["options"]["vocabulary"] == ["culture--german", "culture--irish"]
    irish_vocab = tasks["irish"]["options"]["vocabulary"]
    assert all(not t.startswith(("subregion--", "culture--")) for t in irish_vocab)
    assert len(irish_vocab) == 3
    assert "german" not in tasks  # one tag family with a single tag: nothing to probe


def test_quickstart_config_rejects_unknown_keys(tmp_path, capsys):
    cfg = tmp_path / "qs.yaml"
    cfg.write_text("pieces_per_cultur: 3\n")
    assert cli_main(["quickstart", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "pieces_per_cultur: unknown key" in capsys.readouterr().err
    assert QuickstartConfig().base_culture == "german"


def test_quickstart_into_a_folder_from_another_corpus_version_says_what_to_do(tmp_path, capsys):
    out = tmp_path / "qs"
    (out / "corpus").mkdir(parents=True)
    (out / "corpus" / ".corpus-build.json").write_text(json.dumps({"render_version": 0}))
    assert cli_main(["quickstart", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "rendered with different settings" in err and f"pass another --out, or delete {out}" in err


def test_heldout_table_is_the_trainers_validation(tmp_path):
    """One implementation: the quickstart's held-out numbers for an export equal the run's last validation point."""
    from culturemert.train import Trainer, load_recipe

    prepared = make_prepared_dir(tmp_path / "prep", files_per_culture=3, valid_files=1)
    recipe = load_recipe("tiny-test", [f"data.dirs=[{prepared}]", "stages.1.steps=2"])
    Trainer(recipe, tmp_path / "run").run()
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"validation"' in line][-1]
    table = heldout_masked_loss(tmp_path / "run" / "exports" / "final", {"western": prepared, "makam": prepared},
                                crops_per_culture=4, batch_clips=4, crop_seconds=1.0, seed=recipe.seed,
                                objective=recipe.objective)
    assert set(table) == {"western", "makam"}
    for culture, metrics in table.items():
        for key in ("loss", "pred_loss", "acc", "ce_0", "acc_1", "cqt_mse"):
            assert metrics[key] == pytest.approx(last["cultures"][culture][key], rel=1e-6, abs=1e-9), (culture, key)
        assert metrics["masked_ce"] == metrics["pred_loss"] and metrics["masked_acc"] == metrics["acc"]


def test_quickstart_checks_its_inputs_before_any_work(tmp_path, capsys):
    check_inputs(QuickstartConfig())  # the shipped recipes, base and teacher are all there
    assert len(QUICKSTART_RECIPES) == 4
    with pytest.raises(ConfigError, match="--symbtr: .*nowhere does not exist"):
        check_inputs(QuickstartConfig(symbtr=tmp_path / "nowhere"))
    out = tmp_path / "qs"
    assert cli_main(["quickstart", "--symbtr", str(tmp_path / "nowhere"), "--out", str(out), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()  # nothing rendered


def test_report_embeds_the_run_curves_and_says_best_and_alarms(tmp_path):
    from culturemert.quickstart import write_quickstart_report

    run = tmp_path / "runs" / "cpt"
    run.mkdir(parents=True)
    (run / "loss_curve.png").write_bytes(b"png")
    (run / "validation.json").write_text(json.dumps({
        "metric": "loss", "new": ["chinese", "irish"], "protected": ["german"],
        "best": {"global_step": 120, "value": 1.5}, "last": {"global_step": 300, "value": 1.6}}))
    (run / "metrics.jsonl").write_text(json.dumps({"event": "forgetting", "message": "forgetting alarm: german ...",
                                                    "global_step": 90}) + "\n")
    heldout = {"base": {"german": {"masked_ce": 1.2, "masked_acc": 0.7}, "chinese": {"masked_ce": 1.6, "masked_acc": 0.5}}}
    report = write_quickstart_report(tmp_path, heldout, {"total": 1.0}, QuickstartConfig(), "fluidsynth",
                                     ["chinese", "irish"]).read_text()
    assert "| base | 1.200 (70.0 %) | 1.600 (50.0 %) |" in report
    assert "![cpt run](runs/cpt/loss_curve.png)" in report
    assert "1.600 at the end (exports/final), best 1.500 at global step 120 (exports/best)" in report
    assert "forgetting alarms (german): forgetting alarm: german ..." in report


def test_report_has_a_row_per_merge_method_with_its_selected_lambda(tmp_path):
    from culturemert.quickstart import write_quickstart_report

    cell = {"masked_ce": 1.5, "masked_acc": 0.6}
    heldout = {"base": {"german": cell, "chinese": cell},
               "merged-ties": {"german": {"masked_ce": 1.25, "masked_acc": 0.5}, "chinese": cell},
               "merged-tsv": {"german": cell, "chinese": cell}}
    methods = {"ties": {"lambda": 0.5, "admissible": True}, "tsv": {"lambda": 1.0, "admissible": False}}
    report = write_quickstart_report(tmp_path, heldout, {"total": 1.0}, QuickstartConfig(), "fluidsynth",
                                     ["chinese"], methods).read_text()
    assert "| merged-ties (λ = 0.5) | 1.250 (50.0 %) | 1.500 (60.0 %) |" in report
    assert "| merged-tsv (λ = 1, over the limit) |" in report
    assert "german at most 0.05 nats above the base" in report and "merge_vs_mix.md" in report
