import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from culturemert.errors import ConfigError, DataError
from culturemert.evaluate.features import ProbeData, SplitFeatures
from culturemert.evaluate.probe import (
    ProbeSettings,
    make_specs,
    results_digest,
    run_probe,
    train_probe_reference,
    train_probes,
)


def _split(n, chunks, n_layers, dim, k, g, signal_layers, labels=None, strength=2.0):
    track = torch.repeat_interleave(torch.arange(n), chunks)
    y = (torch.rand(n, k, generator=g) < 0.35).float() if labels is None else labels
    x = torch.randn(len(track), n_layers, dim, generator=g)
    for layer in signal_layers:
        x[:, layer, :k] += strength * (2 * y[track] - 1)
    return SplitFeatures(x, track, y)


def _data(seed=0, n_layers=3, dim=12, k=4, signal=(1,)):
    g = torch.Generator().manual_seed(seed)
    return ProbeData(
        _split(60, 2, n_layers, dim, k, g, signal),
        _split(24, 3, n_layers, dim, k, g, signal),
        _split(24, 1, n_layers, dim, k, g, signal),
        [f"tag{i}" for i in range(k)],
    )


def _ragged_data(seed=0, n_layers=3, dim=12, k=4, signal=(1,), strength=0.7):
    """Tracks with 1 to 5 windows, so that a step of whole tracks holds a different number of windows per seed."""
    g = torch.Generator().manual_seed(seed)

    def counts(n):
        return torch.randint(1, 6, (n,), generator=g)

    return ProbeData(
        _split(50, counts(50), n_layers, dim, k, g, signal, strength=strength),
        _split(24, counts(24), n_layers, dim, k, g, signal, strength=strength),
        _split(24, counts(24), n_layers, dim, k, g, signal, strength=strength),
        [f"tag{i}" for i in range(k)],
        window_seconds=5.0,
        hop_seconds=5.0,
    )


FAST = dict(hidden=8, batch_size=16, max_epochs=8, patience=3, lr_patience=1, device="cpu")


@pytest.mark.parametrize(
    "protocol, fallback",
    [("marble", "none"), ("marble-windows", "none"), ("culturemert-paper", "none"), ("marble", "valid_loss")],
)
def test_batched_trainer_equals_one_probe_alone(protocol, fallback):
    # the reference assembles its batches itself (MARBLE's way for track batching), so this also checks the
    # batched trainer's padded, masked steps of whole tracks
    data = _data() if protocol == "marble-windows" else _ragged_data()
    if fallback == "valid_loss":  # validation ROC-AUC undefined: no tag has both classes in valid
        data.valid.labels[:] = 0.0
        data.valid.labels[:, 0] = 1.0
    settings = ProbeSettings(protocol=protocol, validation_fallback=fallback, lrs=[1e-3, 1e-2], seeds=2,
                             **{**FAST, "max_epochs": 10})
    specs = make_specs(settings, data.num_layers)
    assert len(specs) == (3 + 1) * 2 * 2
    outcomes, _ = train_probes(data, specs, settings, progress=False)
    stopped_early = 0
    for spec, batched in zip(specs, outcomes):
        alone = train_probe_reference(data, spec, settings)
        assert batched.spec == spec
        assert batched.best_epoch == alone.best_epoch
        assert batched.epochs_run == alone.epochs_run
        assert batched.optimizer_steps == alone.optimizer_steps
        assert batched.final_lr == pytest.approx(alone.final_lr)
        assert batched.best_valid_score == pytest.approx(alone.best_valid_score, abs=1e-6)
        for metric in batched.valid:
            assert batched.valid[metric] == pytest.approx(alone.valid[metric], abs=1e-6, nan_ok=True)
            assert batched.test[metric] == pytest.approx(alone.test[metric], abs=1e-6)
        if batched.layer_weights is not None:
            np.testing.assert_allclose(batched.layer_weights, alone.layer_weights, atol=1e-5)
        stopped_early += batched.epochs_run < settings.max_epochs
    # the comparison must cover per-probe early stopping (stack compaction) as well as full runs
    assert 0 < stopped_early < len(specs)
    assert {o.final_lr for o in outcomes} - {1e-3, 1e-2}, "some plateau lr reductions must happen"


@pytest.mark.parametrize("n_single, n_weighted, dropout", [(5, 0, 0.2), (3, 2, 0.2), (0, 3, 0.0)])
@pytest.mark.parametrize("ragged", [False, True])
def test_written_out_backward_equals_autograd(n_single, n_weighted, dropout, ragged):
    # the trainer's hand-written backward (gradients into reused buffers) against autograd on the same forward
    from culturemert.evaluate.probe.batched import _forward, _loss_gradients, _ProbeStack, _training_inputs, _Workspace

    g = torch.Generator().manual_seed(3)
    seeds, batch, layers, dim, hidden, tags = 2, 7, 4, 6, 5, 3
    n_probes = n_single + n_weighted
    ws_layers = torch.tensor([1, 2, 3])
    params = {
        "w1": torch.randn(n_probes, dim, hidden, generator=g), "b1": torch.randn(n_probes, hidden, generator=g),
        "w2": torch.randn(n_probes, hidden, tags, generator=g), "b2": torch.randn(n_probes, tags, generator=g),
        "layer_logits": torch.randn(n_probes, 3, generator=g),
    }
    xb = torch.randn(seeds, batch, layers, dim, generator=g)
    rows = torch.randint(0, seeds, (n_probes,), generator=g)
    single_layer = torch.randint(0, layers, (n_single,), generator=g)
    targets = (torch.rand(n_probes, batch, tags, generator=g) < 0.4).float()
    drop = (torch.rand(n_probes, batch, hidden, generator=g) >= dropout).float() / (1 - dropout) if dropout else None

    stack = _ProbeStack(params, _Workspace(torch.device("cpu")))
    if not ragged:
        inputs, weighted = _training_inputs(xb, rows, single_layer, n_single, stack.params["layer_logits"], ws_layers,
                                            stack.workspace)
        _loss_gradients(stack, inputs, weighted, drop, targets, n_single)
        used = torch.full((n_probes,), batch)
    else:
        # padded batches of different lengths per probe, the step split in two row blocks (accumulated)
        used = torch.randint(1, batch + 1, (n_probes,), generator=g)
        used[0] = batch
        row_mask = (torch.arange(batch).view(1, -1, 1) < used.view(-1, 1, 1)).float()
        denominator = (used * tags).float().view(-1, 1, 1)
        for r0, r1, acc in ((0, 3, False), (3, batch, True)):
            inputs, weighted = _training_inputs(xb[:, r0:r1].contiguous(), rows, single_layer, n_single,
                                                stack.params["layer_logits"], ws_layers, stack.workspace)
            _loss_gradients(stack, inputs, weighted, None if drop is None else drop[:, r0:r1].contiguous(),
                            targets[:, r0:r1].contiguous(), n_single, denominator, row_mask[:, r0:r1], accumulate=acc)

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    parts = [xb[rows[i], :, single_layer[i], :] for i in range(n_single)]
    for i in range(n_single, n_probes):
        w = torch.softmax(leaves["layer_logits"][i], -1)
        parts.append(torch.einsum("l,bld->bd", w, xb[rows[i]][:, ws_layers, :]))
    logits = _forward(leaves, torch.stack(parts), drop)
    # the mean BCE over each probe's own rows only
    loss = sum(F.binary_cross_entropy_with_logits(logits[i, : used[i]], targets[i, : used[i]]) for i in range(n_probes))
    loss.backward()
    for name in ("w1", "b1", "w2", "b2") + (("layer_logits",) if n_weighted else ()):
        torch.testing.assert_close(stack.grad(name), leaves[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_weighted_sum_learns_the_informative_layer():
    data = _data(seed=1, n_layers=4, dim=16, k=4, signal=(2,))
    settings = ProbeSettings(layers=[], weighted_sum=True, weighted_sum_layers="all", lrs=[1e-2], seeds=2,
                             hidden=16, batch_size=16, max_epochs=25, patience=25, device="cpu")
    outcomes, _ = train_probes(data, make_specs(settings, 4), settings, progress=False)
    for o in outcomes:
        weights = np.array(o.layer_weights)
        assert int(weights.argmax()) == 2
        assert weights[2] > 0.5
        assert o.test["roc_auc"] > 0.9


def test_selection_uses_validation_only():
    # layer 1 carries the labels in train and valid; layer 2 carries them in train and test only.
    g = torch.Generator().manual_seed(3)
    k = 4
    train = _split(80, 1, 3, 10, k, g, (1, 2))
    y_valid = (torch.rand(30, k, generator=g) < 0.4).float()
    y_test = (torch.rand(30, k, generator=g) < 0.4).float()
    valid = _split(30, 1, 3, 10, k, g, (1,), labels=y_valid)
    test = _split(30, 1, 3, 10, k, g, (2,), labels=y_test)
    data = ProbeData(train, valid, test, [f"t{i}" for i in range(k)])
    settings = ProbeSettings(layers=[1, 2], weighted_sum=False, lrs=[5e-3], seeds=2, **{**FAST, "max_epochs": 10})
    results = run_probe(data, settings, progress=False)
    layers = results["summary"]["layers"]
    assert layers["2"]["test"]["roc_auc"]["mean"] > layers["1"]["test"]["roc_auc"]["mean"] + 0.2  # test prefers 2
    assert results["summary"]["selected"]["layer"] == "1"  # but validation chose 1
    # checkpoint epochs are chosen on validation too: recorded best epochs match the max of the valid AUC path
    for probe in results["probes"]:
        assert 1 <= probe["best_epoch"] <= probe["epochs_run"]


def test_probe_is_deterministic():
    data = _data(seed=4)
    settings = ProbeSettings(lrs=[1e-3], seeds=2, **FAST)
    a = run_probe(data, settings, progress=False)
    b = run_probe(data, settings, progress=False)
    assert results_digest(a) == results_digest(b)
    c = run_probe(data, ProbeSettings(lrs=[1e-3], seeds=2, **{**FAST, "seed": 99}), progress=False)
    assert results_digest(a) != results_digest(c)


def test_track_scores_average_chunk_logits():
    # a track whose chunks disagree: the mean of chunk logits decides, and chunk grouping is validated
    with pytest.raises(Exception, match="grouped by track"):
        SplitFeatures(torch.zeros(3, 1, 2), torch.tensor([0, 1, 0]), torch.zeros(2, 1))
    with pytest.raises(Exception, match="at least one chunk"):
        SplitFeatures(torch.zeros(2, 1, 2), torch.tensor([0, 0]), torch.zeros(2, 1))


def test_probe_cli_runs_from_config_and_rejects_unknown_keys(tmp_path):
    from culturemert.cli import main
    from culturemert.evaluate.features import write_features

    data = _data(seed=5)

    class Item:
        def __init__(self, i, split, tags):
            self.id, self.split, self.tags = f"t{i}", split, tags

    arrays, items = [], []
    vocab = data.vocabulary
    for split_name in ("train", "valid", "test"):
        sf = getattr(data, split_name)
        for t in range(sf.num_tracks):
            rows = sf.features[sf.chunk_track == t].numpy()
            arrays.append(rows)
            items.append(Item(len(items), split_name, [vocab[j] for j in range(len(vocab)) if sf.labels[t, j] > 0]))
    feats = tmp_path / "feats"
    write_features(feats, arrays, items, vocab, {"dataset": "synthetic", "model": "m", "model_fingerprint": "x",
                                                     "num_layers": 3, "dim": 12})
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(f"features: {feats}\nlrs: [1e-3]\nseeds: 2\nhidden: 8\nmax_epochs: 3\ndevice: cpu\n")
    assert main(["probe", str(cfg), "--no-progress"]) == 0
    results = json.loads((feats / "probe" / "results.json").read_text())
    assert results["dataset"] == "synthetic" and len(results["probes"]) == 4 * 1 * 2
    assert results["num_tracks"] == {"train": 60, "valid": 24, "test": 24}
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"features: {feats}\nlearning_rates: [1e-3]\n")
    assert main(["probe", str(bad)]) == 2


# ------------------------------------------------------------------------------------------------ protocols


def test_marble_protocol_steps_over_tracks_with_all_their_windows():
    # MARBLE v1: a step = batch_size tracks, each with all its windows (train_collate_fn stacks them); an epoch is a
    # pass over the tracks. Window batching (64 windows a step) took n_windows / n_tracks times more steps.
    from culturemert.evaluate.probe import PROTOCOLS
    from culturemert.evaluate.probe.streams import SeedStreams, epoch_rows

    assert ProbeSettings().protocol == "marble" and PROTOCOLS["marble"].batching == "track"
    data = _ragged_data(seed=2)
    train = data.train
    n_tracks, n_windows = train.num_tracks, train.features.shape[0]
    streams = SeedStreams(1234, torch.device("cpu"))
    steps = epoch_rows("track", train, streams, 16)
    assert len(steps) == -(-n_tracks // 16)
    seen = []
    for rows in steps:
        tracks = train.chunk_track[rows].unique()
        assert len(tracks) <= 16
        whole = torch.cat([torch.arange(train.chunk_start[t], train.chunk_start[t + 1]) for t in tracks.tolist()])
        assert sorted(rows.tolist()) == sorted(whole.tolist())  # every window of each track, no other window
        seen += rows.tolist()
    assert sorted(seen) == list(range(n_windows))
    # culturemert-paper: one window per track per epoch, drawn anew every epoch
    first, second = (torch.cat(epoch_rows("random-window", train, streams, 16)) for _ in range(2))
    assert sorted(train.chunk_track[first].tolist()) == list(range(n_tracks))
    assert not torch.equal(first.sort().values, second.sort().values)

    epochs = 3
    for protocol, expected_steps in (("marble", -(-n_tracks // 16)), ("marble-windows", -(-n_windows // 16)),
                                     ("culturemert-paper", -(-n_tracks // 16))):
        settings = ProbeSettings(protocol=protocol, layers=[1], weighted_sum=False, lrs=[1e-3], seeds=1,
                                 **{**FAST, "max_epochs": epochs, "patience": 10})
        (outcome,), _ = train_probes(data, make_specs(settings, data.num_layers), settings, progress=False)
        assert outcome.optimizer_steps == epochs * expected_steps, protocol
    results = run_probe(data, ProbeSettings(lrs=[1e-3], seeds=1, **{**FAST, "max_epochs": 2}), progress=False)
    assert results["protocol"] == "marble"
    assert results["protocol_details"]["batching"] == "track"
    assert results["protocol_details"]["batch_unit"] == "tracks"


def test_truncation_at_probe_time_keeps_the_windows_of_the_truncated_audio():
    # the paper's cuts applied to cached windows == embedding the cut audio (5-s windows, cuts multiple of 5 s)
    from culturemert.evaluate.embed import chunk_bounds
    from culturemert.evaluate.features import truncate_windows

    sr, window, limit = 100, 5.0, 150.0
    lengths = [3.0, 12.0, 147.6, 148.0, 150.0, 152.4, 200.0, 1000.0]
    starts, owners = [], []
    for t, seconds in enumerate(lengths):
        bounds = chunk_bounds(int(seconds * sr), sr, window)
        starts += [a / sr for a, _ in bounds]
        owners += [t] * len(bounds)
    x = torch.tensor(starts).view(-1, 1, 1).repeat(1, 2, 3)  # each window carries its start time
    split = SplitFeatures(x, torch.tensor(owners), torch.zeros(len(lengths), 2))
    data = ProbeData(split, split, split, ["a", "b"], window_seconds=window, hop_seconds=window)
    cut, dropped = truncate_windows(data, limit)
    for t, seconds in enumerate(lengths):
        kept = cut.train.features[cut.train.chunk_track == t, 0, 0].tolist()
        expected = [a / sr for a, _ in chunk_bounds(int(min(seconds, limit) * sr), sr, window)]
        assert kept == pytest.approx(expected), seconds
    assert dropped["train"] == split.features.shape[0] - cut.train.features.shape[0] > 0
    whole = ProbeData(split, split, split, ["a", "b"], window_seconds=0.0, hop_seconds=0.0)
    with pytest.raises(DataError, match="whole-track chunks"):
        truncate_windows(whole, limit)


def test_paper_protocol_cuts_per_dataset_and_records_its_name():
    from dataclasses import replace

    long = _ragged_data(seed=3)
    settings = ProbeSettings(protocol="culturemert-paper", lrs=[1e-3], seeds=1, **{**FAST, "max_epochs": 2})
    # window 5 s: the makam cut (150 s) keeps 30 windows, so make the tracks longer than that
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([40, 25, 31, 2] * 10)
    long = replace(long, train=_split(40, counts, 3, 12, 4, g, (1,)), dataset="makam")
    results = run_probe(long, settings, progress=False)
    details = results["protocol_details"]
    assert results["protocol"] == "culturemert-paper" and details["truncate_seconds"] == 150.0
    assert details["windows_dropped"]["train"] == 10 * (10 + 1)  # 40 -> 30 and 31 -> 30 windows
    assert results["settings"]["protocol"] == "culturemert-paper"
    assert run_probe(replace(long, dataset="lyra"), settings, progress=False)["protocol_details"]["windows_dropped"] == {}
    custom = settings.model_copy(update={"truncate_seconds": {"lyra": 20.0, "makam": None}})
    assert run_probe(replace(long, dataset="makam"), custom, progress=False)["protocol_details"]["truncate_seconds"] is None
    assert run_probe(replace(long, dataset="lyra"), custom, progress=False)["protocol_details"]["truncate_seconds"] == 20.0
    overlapping = replace(long, hop_seconds=2.5)
    with pytest.raises(ConfigError, match="non-overlapping"):
        run_probe(overlapping, settings, progress=False)


# ------------------------------------------------------------------------------------------------ selection


def test_unscorable_validation_split_is_refused_unless_a_fallback_is_chosen():
    data = _data(seed=6)
    data.valid.labels[:] = 0.0
    data.valid.labels[:, 0] = 1.0  # tag0 positive everywhere, the others nowhere: no tag has both classes
    settings = ProbeSettings(lrs=[1e-3, 1e-2], seeds=2, **{**FAST, "max_epochs": 3})
    with pytest.raises(DataError, match=r"valid split \(24 tracks\).*positive on every track: tag0.*no positive: tag1"):
        run_probe(data, settings, progress=False)
    with pytest.raises(DataError, match="valid split"):
        train_probes(data, make_specs(settings, data.num_layers), settings, progress=False)
    results = run_probe(data, settings.model_copy(update={"validation_fallback": "valid_loss"}), progress=False)
    assert results["summary"]["selection_metric"] == "valid_loss"
    assert results["protocol_details"]["monitor"] == "valid_loss"
    assert "validation BCE loss" in results["protocol_details"]["selection_fallback"]
    best = min(results["summary"]["grid"], key=lambda g: g["valid_loss"]["mean"])
    assert (results["summary"]["selected"]["layer"], results["summary"]["selected"]["lr"]) == (best["layer"], best["lr"])


def test_a_probe_whose_validation_is_never_finite_is_never_selected():
    data = _data(seed=8)
    data.valid.features[3, 2, 0] = float("nan")  # every probe reading hidden state 2 scores NaN on validation
    settings = ProbeSettings(weighted_sum=False, lrs=[1e-3], seeds=2, **{**FAST, "max_epochs": 4, "patience": 4})
    results = run_probe(data, settings, progress=False)
    for probe in results["probes"]:
        if probe["spec"]["layer"] == 2:
            assert probe["epochs_run"] == 1 and probe["best_epoch"] == 0  # stopped at once (Lightning check_finite)
            assert np.isnan(probe["best_valid_score"])
    assert results["summary"]["unscorable"] == ["layer 2 lr 0.001"]
    assert "2" not in results["summary"]["layers"] and results["summary"]["selected"]["layer"] != "2"
    only_bad = settings.model_copy(update={"layers": [2]})
    with pytest.raises(DataError, match="no probe configuration has a finite validation roc_auc"):
        run_probe(data, only_bad, progress=False)


# ------------------------------------------------------------------------------------------------ features folders


class _Item:
    def __init__(self, id_, split, tags):
        self.id, self.split, self.tags = id_, split, tags


def _write_folder(path, data, keys=None):
    from culturemert.evaluate.features import write_features

    arrays, items = [], []
    vocab = data.vocabulary
    for split_name in ("train", "valid", "test"):
        sf = getattr(data, split_name)
        for t in range(sf.num_tracks):
            arrays.append(sf.features[sf.chunk_track == t].numpy())
            items.append(_Item(f"{split_name}_{t}.wav", split_name,
                               [vocab[j] for j in range(len(vocab)) if sf.labels[t, j] > 0]))
    write_features(path, arrays, items, vocab, {"dataset": "synthetic", "model": "m", "model_fingerprint": "x",
                                                "num_layers": data.num_layers, "dim": data.dim,
                                                "settings": {"window": 5.0, "hop": 5.0}},
                   audio_keys=None if keys is None else keys(items))
    return items


def test_probe_refuses_non_finite_features_naming_folder_track_and_hidden_state(tmp_path):
    from culturemert.evaluate.features import load_probe_data

    data = _data(seed=9)
    data.test.features[5, 2, 7] = float("inf")  # test track 5 (one window per track), hidden state 2
    folder = tmp_path / "feats of model"
    _write_folder(folder, data)
    with pytest.raises(DataError, match=r"feats of model: non-finite .* track 'test_5\.wav' \(test split\), hidden state 2"):
        load_probe_data(folder)
    data.test.features[9, 0, 0] = float("nan")
    _write_folder(folder, data)
    with pytest.raises(DataError, match=r"'test_5\.wav'.*hidden state 2 \(and 1 more track"):
        load_probe_data(folder)
    # a λ sweep reads train and valid only: the bad test tracks do not concern it
    load_probe_data(folder, require_test=False, splits=("train", "valid"))


def test_identical_audio_in_two_splits_is_reported_and_refused_when_strict(tmp_path, caplog):
    import logging

    from culturemert.evaluate.features import load_probe_data

    data = _data(seed=10)

    def keys(items):  # a byte-identical copy of train_0 listed as test_3; valid_1 = train_7
        out = [f"{i:064x}" for i in range(len(items))]
        ids = [it.id for it in items]
        out[ids.index("test_3.wav")] = out[ids.index("train_0.wav")]
        out[ids.index("valid_1.wav")] = out[ids.index("train_7.wav")]
        return out

    folder = tmp_path / "feats"
    with caplog.at_level(logging.WARNING):
        _write_folder(folder, data, keys)
    assert "'train_0.wav' (train) = 'test_3.wav' (test)" in caplog.text
    meta = json.loads((folder / "meta.json").read_text())
    assert [[m["id"] for m in g["tracks"]] for g in meta["duplicate_audio"]] == [
        ["train_0.wav", "test_3.wav"], ["train_7.wav", "valid_1.wav"]]
    loaded, _ = load_probe_data(folder)
    assert len(loaded.duplicates) == 2
    settings = ProbeSettings(lrs=[1e-3], seeds=1, **{**FAST, "max_epochs": 2})
    with pytest.raises(DataError, match=r"2 recording\(s\) with identical audio.*'train_0\.wav' \(train\) = 'test_3\.wav' \(test\)"):
        run_probe(loaded, settings.model_copy(update={"duplicate_audio": "error"}), progress=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        results = run_probe(loaded, settings, progress=False)
    assert "identical audio" in caplog.text and len(results["duplicate_audio"]) == 2
    # a validation-only run (λ sweep) only sees the train/valid pair
    valid_only, _ = load_probe_data(folder, require_test=False, splits=("train", "valid"))
    assert [[m["id"] for m in g["tracks"]] for g in valid_only.duplicates] == [["train_7.wav", "valid_1.wav"]]


def test_evaluate_cli_takes_a_csv_names_the_protocol_everywhere_and_reports_copied_audio(tmp_path, capsys):
    import shutil

    import soundfile as sf

    from culturemert.cli import main

    rng = np.random.default_rng(0)
    rows = ["path,split,tags"]
    for i in range(18):
        split = ("train", "train", "valid", "test")[i % 4] if i < 16 else "train"
        tone = 300 if i % 2 else 900
        t = np.arange(int(1.3 * 24000)) / 24000
        sf.write(tmp_path / f"c{i}.wav", 0.3 * np.sin(2 * np.pi * tone * t) + 0.05 * rng.standard_normal(t.size), 24000)
        rows.append(f"c{i}.wav,{split},{'hi' if i % 2 else 'lo'}{'|both' if i % 3 == 0 else ''}")
    shutil.copyfile(tmp_path / "c0.wav", tmp_path / "copy_of_c0.wav")  # same bytes, another name, test split
    rows.append("copy_of_c0.wav,test,lo|both")
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "eval.yaml").write_text(
        "datasets:\n  - {kind: csv, name: makam, paths: {path: set.csv}}\nembed: {window: 0.5, decode_workers: 0}\n"
        "probe: {lrs: [1.0e-2], seeds: 1, max_epochs: 3, hidden: 8, device: cpu}\n")
    out = tmp_path / "out"
    argv = ["evaluate", "--model", "baseline:logmel", "--datasets", str(tmp_path / "eval.yaml"), "--out", str(out),
            "--no-progress"]
    assert main(argv + ["--protocol", "culturemert-paper"]) == 0
    results = json.loads(next(out.glob("runs/*/makam/results.json")).read_text())
    assert results["protocol"] == "culturemert-paper" and results["settings"]["protocol"] == "culturemert-paper"
    assert results["protocol_details"]["truncate_seconds"] == 150.0
    assert [[m["id"] for m in g["tracks"]] for g in results["duplicate_audio"]] == [["c0", "copy_of_c0"]]
    report = (out / "report" / "report.md").read_text()
    assert "Protocol: culturemert-paper" in report and "(protocol culturemert-paper)" in report
    capsys.readouterr()
    assert main(argv + ["--duplicate-audio", "error"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'c0' (train) = 'copy_of_c0' (test)" in err
    # the CSV itself is a valid --datasets argument (default settings would take long: only check it loads)
    from culturemert.evaluate.pipeline import _load_eval_config

    assert _load_eval_config(tmp_path / "set.csv")[0].datasets[0].kind == "csv"


def test_a_step_split_into_row_blocks_gives_the_same_probes():
    # long tracks make a track-batched step large; the memory knob splits it into accumulated row blocks
    data = _ragged_data(seed=12)
    settings = ProbeSettings(lrs=[1e-3, 1e-2], seeds=2, **FAST)
    specs = make_specs(settings, data.num_layers)
    whole, _ = train_probes(data, specs, settings, progress=False)
    blocked, _ = train_probes(data, specs, settings.model_copy(update={"train_block_floats": 1000}), progress=False)
    for a, b in zip(whole, blocked):
        assert (a.best_epoch, a.epochs_run, a.optimizer_steps) == (b.best_epoch, b.epochs_run, b.optimizer_steps)
        for metric in a.test:
            assert a.test[metric] == pytest.approx(b.test[metric], abs=1e-6)
