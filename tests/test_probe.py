import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


FAST = dict(hidden=8, batch_size=16, max_epochs=8, patience=3, lr_patience=1, device="cpu")


def test_batched_trainer_equals_one_probe_alone():
    data = _data()
    settings = ProbeSettings(lrs=[1e-3, 1e-2], seeds=2, **FAST)
    specs = make_specs(settings, data.num_layers)
    assert len(specs) == (3 + 1) * 2 * 2
    outcomes, _ = train_probes(data, specs, settings, progress=False)
    stopped_early = 0
    for spec, batched in zip(specs, outcomes):
        alone = train_probe_reference(data, spec, settings)
        assert batched.spec == spec
        assert batched.best_epoch == alone.best_epoch
        assert batched.epochs_run == alone.epochs_run
        assert batched.final_lr == pytest.approx(alone.final_lr)
        for metric in batched.valid:
            assert batched.valid[metric] == pytest.approx(alone.valid[metric], abs=1e-6)
            assert batched.test[metric] == pytest.approx(alone.test[metric], abs=1e-6)
        if batched.layer_weights is not None:
            np.testing.assert_allclose(batched.layer_weights, alone.layer_weights, atol=1e-5)
        stopped_early += batched.epochs_run < settings.max_epochs
    # the comparison must cover per-probe early stopping (stack compaction) as well as full runs
    assert 0 < stopped_early < len(specs)
    assert {o.final_lr for o in outcomes} - {1e-3, 1e-2}, "some plateau lr reductions must happen"


@pytest.mark.parametrize("n_single, n_weighted, dropout", [(5, 0, 0.2), (3, 2, 0.2), (0, 3, 0.0)])
def test_written_out_backward_equals_autograd(n_single, n_weighted, dropout):
    # the trainer's hand-written backward (gradients into reused buffers) against autograd on the same forward
    from culturemert.evaluate.probe import _forward, _loss_gradients, _ProbeStack, _training_inputs, _Workspace

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
    inputs, weighted = _training_inputs(xb, rows, single_layer, n_single, stack.params["layer_logits"], ws_layers,
                                        stack.workspace)
    _loss_gradients(stack, inputs, weighted, drop, targets, n_single)

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    parts = [xb[rows[i], :, single_layer[i], :] for i in range(n_single)]
    for i in range(n_single, n_probes):
        w = torch.softmax(leaves["layer_logits"][i], -1)
        parts.append(torch.einsum("l,bld->bd", w, xb[rows[i]][:, ws_layers, :]))
    logits = _forward(leaves, torch.stack(parts), drop)
    loss = sum(F.binary_cross_entropy_with_logits(logits[i], targets[i]) for i in range(n_probes))
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
