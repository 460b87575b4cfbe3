"""The quickstart end to end at smoke size: every stage runs through the public API and the report is complete."""

from __future__ import annotations

import json

import pytest

from culturemert.cli import main as cli_main
from culturemert.quickstart import QuickstartConfig, build_tasks

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
    "heldout_batches": 1,
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
    assert set(heldout) == {"base", "control", "cpt", "merged-ta"}
    assert set(heldout["cpt"]) == {"german", "chinese", "irish"}
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
