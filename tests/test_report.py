import csv
import json

import pytest
import torch

from culturemert.evaluate.features import ProbeData, SplitFeatures
from culturemert.evaluate.probe import ProbeSettings, run_probe
from culturemert.evaluate.report import load_runs, write_report


def _data(seed, strength):
    g = torch.Generator().manual_seed(seed)

    def split(n):
        y = (torch.rand(n, 3, generator=g) < 0.4).float()
        x = torch.randn(n, 2, 6, generator=g)
        x[:, 1, :3] += strength * (2 * y - 1)
        return SplitFeatures(x, torch.arange(n), y)

    return ProbeData(split(40), split(20), split(20), ["a", "b", "c"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    settings = ProbeSettings(lrs=[1e-2], seeds=2, hidden=4, max_epochs=3, patience=2, device="cpu")
    for m, (model, strength) in enumerate([("base", 0.3), ("culture", 1.5)]):
        for d, dataset in enumerate(["magnatagatune", "makam"]):
            res = run_probe(_data(10 * m + d, strength), settings, progress=False, context={"model": model, "dataset": dataset})
            (root / model / dataset).mkdir(parents=True)
            (root / model / dataset / "results.json").write_text(json.dumps(res))
    return root


def test_report_tables_and_plots(runs, tmp_path):
    loaded = load_runs([runs])
    assert len(loaded) == 4
    written = write_report(loaded, tmp_path, base="base")
    for name in ("report.md", "roc_auc_ap.csv", "f1.csv", "layers.csv", "transfer.csv", "layers_makam.png",
                 "layers_magnatagatune.png", "transfer_roc_auc.png", "transfer_ap.png"):
        assert (tmp_path / name).is_file(), name
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "roc_auc_ap.csv") as fh:
        rows = list(csv.reader(fh))
    # paper column order (makam before MTAT), one row per model, mean/std per metric per dataset, plus avg
    assert rows[0][:5] == ["model", "makam_roc_auc_mean", "makam_roc_auc_std", "makam_ap_mean", "makam_ap_std"]
    assert rows[0][-1] == "avg" and len(rows[0]) == 1 + 2 * 2 * 2 + 1
    assert [r[0] for r in rows[1:]] == ["base", "culture"]
    by_key = {(r["model"], r["dataset"]): r for r in loaded}
    sel = by_key[("culture", "makam")]["summary"]["selected"]["test"]
    assert float(rows[2][1]) == pytest.approx(100 * sel["roc_auc"]["mean"], abs=1e-3)
    assert float(rows[2][2]) == pytest.approx(100 * sel["roc_auc"]["std"], abs=1e-3)
    numbers = [float(v) for i, v in enumerate(rows[2][1:-1]) if i % 2 == 0]
    assert float(rows[2][-1]) == pytest.approx(sum(numbers) / 4, abs=1e-3)
    with open(tmp_path / "f1.csv") as fh:
        assert next(csv.reader(fh))[1] == "makam_micro_f1_mean"
    with open(tmp_path / "transfer.csv") as fh:
        transfer = list(csv.DictReader(fh))
    base_rows = [t for t in transfer if t["model"] == "base"]
    assert base_rows and all(float(t["delta"]) == 0 for t in base_rows)
    t = next(t for t in transfer if t["model"] == "culture" and t["dataset"] == "makam" and t["metric"] == "roc_auc")
    base_sel = by_key[("base", "makam")]["summary"]["selected"]["test"]["roc_auc"]
    assert float(t["delta"]) == pytest.approx(100 * (sel["roc_auc"]["mean"] - base_sel["mean"]), abs=1e-3)
    assert float(t["spread"]) == pytest.approx(100 * (sel["roc_auc"]["std"] ** 2 + base_sel["std"] ** 2) ** 0.5, abs=1e-3)
    with open(tmp_path / "layers.csv") as fh:
        layer_rows = list(csv.DictReader(fh))
    assert {r["layer"] for r in layer_rows} == {"0", "1", "weighted"} and len(layer_rows) == 2 * 2 * 3
    md = (tmp_path / "report.md").read_text()
    assert "| model | Turkish-makam | MTAT | Avg. |" in md and "Δ roc_auc vs base" in md


def test_report_cli_and_errors(runs, tmp_path):
    from culturemert.cli import main

    assert main(["report", str(runs), "--out", str(tmp_path / "r"), "--base", "culture"]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    assert main(["report", str(runs), "--out", str(tmp_path / "r2"), "--base", "nobody"]) == 2
    (tmp_path / "junk.json").write_text("{}")
    assert main(["report", str(tmp_path / "junk.json"), "--out", str(tmp_path / "r3")]) == 2


def test_evaluate_pipeline_and_validation_only_sweep(tmp_path):
    import numpy as np
    import soundfile as sf

    from culturemert.cli import main
    from culturemert.evaluate.pipeline import evaluate_on_validation

    rng = np.random.default_rng(0)
    audio = tmp_path / "audio"
    audio.mkdir()
    lines = ["path,split,tags"]
    for i in range(18):
        split = ["train", "train", "valid", "test", "train", "valid"][i % 6]
        tags = "drone|voice" if i % 2 else "voice"
        sf.write(audio / f"c{i}.wav", (rng.normal(size=6000) * (0.3 if i % 2 else 0.05)).astype(np.float32), 24000)
        lines.append(f"audio/c{i}.wav,{split},{tags}")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        "datasets:\n  - kind: csv\n    name: toy\n    paths: {path: data.csv}\n"
        "embed: {window: 0.25, device: cpu, decode_workers: 0}\n"
        "probe: {lrs: [1e-2], seeds: 2, hidden: 8, max_epochs: 3, device: cpu}\n"
    )
    out = tmp_path / "out"
    assert main(["evaluate", "--model", "baseline:logmel", "preset:tiny", "--datasets", str(cfg), "--out", str(out),
                 "--base", "baseline:logmel", "--no-progress"]) == 0
    md = (out / "report" / "report.md").read_text()
    assert "| baseline:logmel |" in md and "| preset-tiny |" in md
    results = json.loads((out / "runs" / "preset-tiny" / "toy" / "results.json").read_text())
    assert results["num_tracks"] == {"train": 9, "valid": 6, "test": 3}
    valid = evaluate_on_validation("preset:tiny", cfg, out_dir=tmp_path / "sweep")
    assert set(valid) == {"toy"} and set(valid["toy"]) == {"roc_auc", "ap", "micro_f1", "macro_f1"}
    sweep = json.loads((tmp_path / "sweep" / "runs_valid" / "preset-tiny" / "toy" / "results.json").read_text())
    assert "test" not in sweep["num_tracks"] and all(p["test"] is None for p in sweep["probes"])
    meta = json.loads((tmp_path / "sweep" / "features_valid" / "preset-tiny" / "toy" / "meta.json").read_text())
    assert {t["split"] for t in meta["tracks"]} == {"train", "valid"}  # the test split is not even embedded


def test_leaderboard_ranks_encoders_and_reports_embedding_cost(runs, tmp_path):
    loaded = load_runs([runs])
    for r in loaded:
        r["encoder"] = {"family": "mert", "sample_rate": 24000, "frame_rate": 75.0, "num_hidden_states": 2, "dim": 6,
                        "trust_remote_code": r["model"] == "culture", "device": "cpu"}
        r["embedding"] = {"computed": 40, "cached": 0, "audio_seconds": 200.0, "seconds": 4.0, "forward_seconds": 3.0,
                          "real_time_factor": 0.02, "peak_memory_bytes": 300 * 2**20, "memory_kind": "process_rss",
                          "world_size": 1, "from_cache": False}
    written = write_report(loaded, tmp_path, base="base")
    by_key = {(r["model"], r["dataset"]): r["summary"]["selected"]["test"]["roc_auc"]["mean"] for r in loaded}
    mean = {m: (by_key[(m, "makam")] + by_key[(m, "magnatagatune")]) / 2 for m in ("base", "culture")}
    best = max(mean, key=mean.get)
    with open(written["leaderboard.csv"]) as fh:
        rows = list(csv.reader(fh))
    assert rows[0][1] == f"{best}_roc_auc_mean" and [r[0] for r in rows[1:]] == ["makam", "magnatagatune"]
    assert float(rows[1][1]) == pytest.approx(100 * by_key[(best, "makam")], abs=1e-3)
    lb = written["leaderboard.md"].read_text()
    assert "| **rank** | 1 | 2 |" in lb and "layer" in lb
    md = (tmp_path / "report.md").read_text()
    assert "## Leaderboard" in md and "remote code: **yes**" in md and "## Embedding cost" in md
    with open(written["embedding.csv"]) as fh:
        cost = list(csv.DictReader(fh))
    assert len(cost) == 4 and {c["real_time_factor"] for c in cost} == {"0.02"} and cost[0]["peak_memory_bytes"] == str(300 * 2**20)
    assert "| base | cpu | 80 | 400 | 8.0 | 0.0200 | 50 | 300 | process_rss | no |" in md  # summed over datasets
