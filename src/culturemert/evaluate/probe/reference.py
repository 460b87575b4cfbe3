"""One probe trained with plain torch modules (``nn.Linear``, ``torch.optim.Adam``, ``ReduceLROnPlateau``): the
oracle that the batched trainer must equal in the tests."""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F

from culturemert.evaluate.features import ProbeData, SplitFeatures
from culturemert.runtime import resolve_device
from culturemert.evaluate.metrics import batched_macro_roc_auc, tagging_scores
from culturemert.evaluate.probe.batched import validation_monitor
from culturemert.evaluate.probe.settings import WEIGHTED, ProbeOutcome, ProbeSettings, ProbeSpec, weighted_sum_layers
from culturemert.evaluate.probe.streams import SeedStreams, initial_weights

log = logging.getLogger(__name__)


# the plain one-probe reference (tests, and the sequential baseline of bench/probe.py)


class _ReferenceProbe(torch.nn.Module):
    def __init__(self, dim: int, hidden: int, num_tags: int, layer: int | str, ws_layers: list[int]):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, num_tags)
        self.layer = layer
        self.ws_layers = ws_layers
        if layer == WEIGHTED:
            self.layer_logits = torch.nn.Parameter(torch.zeros(len(ws_layers)))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer == WEIGHTED:
            return torch.einsum("l,bld->bd", torch.softmax(self.layer_logits, -1), x[:, self.ws_layers, :])
        return x[:, int(self.layer), :]

    def forward(self, x: torch.Tensor, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.fc1(self.inputs(x)))
        if dropout_mask is not None:
            h = h * dropout_mask
        return self.fc2(h)


def train_probe_reference(
    data: ProbeData, spec: ProbeSpec, settings: ProbeSettings, *, evaluate_test: bool = True
) -> ProbeOutcome:
    """Train one probe the ordinary way (nn.Linear, torch.optim.Adam, ReduceLROnPlateau, a best-state copy).

    Draws the same per-seed random numbers as :func:`train_probes`, so both must agree to float rounding. Its
    batches are assembled here, independently of the batched trainer, the way MARBLE's data loader does
    (``track``: the windows of ``batch_size`` shuffled tracks stacked, each with its track's labels), or one
    window per step slot (``window``) or one drawn window per track (``random-window``).
    """
    monitor = validation_monitor(data, settings)
    device = resolve_device(settings.device)
    ws_list = weighted_sum_layers(settings, data.num_layers)
    init = initial_weights(spec.seed, data.dim, settings.hidden, data.num_tags, len(ws_list))
    model = _ReferenceProbe(data.dim, settings.hidden, data.num_tags, spec.layer, ws_list)
    with torch.no_grad():
        model.fc1.weight.copy_(init["w1"].T)
        model.fc1.bias.copy_(init["b1"])
        model.fc2.weight.copy_(init["w2"].T)
        model.fc2.bias.copy_(init["b2"])
        if spec.layer == WEIGHTED:
            model.layer_logits.copy_(init["layer_logits"])
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, betas=settings.adam_betas, eps=settings.adam_eps)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max" if monitor == "roc_auc" else "min", factor=settings.lr_factor,
        patience=settings.lr_patience, threshold=settings.lr_threshold, min_lr=settings.min_lr,
    )
    streams = SeedStreams(spec.seed, device)
    train = data.train
    train_x = train.features.to(device)
    track_y = train.labels.to(device=device, dtype=torch.float32)
    window_y = track_y[train.chunk_track.to(device)]
    starts = train.chunk_start.tolist()
    counts = train.chunk_start[1:] - train.chunk_start[:-1]

    def batches():
        """(inputs, targets) of every step of one epoch."""
        if settings.batching == "window":
            perm = streams.permutation(train_x.shape[0]).to(device)
            for b0 in range(0, perm.shape[0], settings.batch_size):
                idx = perm[b0 : b0 + settings.batch_size]
                yield train_x[idx], window_y[idx]
            return
        perm = streams.permutation(train.num_tracks).tolist()
        pick = streams.window_choice(counts).tolist() if settings.batching == "random-window" else None
        for b0 in range(0, len(perm), settings.batch_size):
            tracks = perm[b0 : b0 + settings.batch_size]
            if pick is not None:
                x = torch.stack([train_x[starts[t] + pick[t]] for t in tracks])
                y = track_y[tracks]
            else:  # MARBLE: every window of the track, each with the track's labels, stacked
                x = torch.cat([train_x[starts[t] : starts[t + 1]] for t in tracks])
                y = torch.cat([track_y[t].expand(starts[t + 1] - starts[t], -1) for t in tracks])
            yield x, y

    def split_logits(split: SplitFeatures) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            chunk_logits = model(split.features.to(device))
            sums = torch.zeros(split.num_tracks, data.num_tags, device=device)
            sums.index_add_(0, split.chunk_track.to(device), chunk_logits)
            counts_ = torch.bincount(split.chunk_track.to(device), minlength=split.num_tracks).unsqueeze(1)
        model.train()
        return sums / counts_

    def monitored() -> float:
        logits = split_logits(data.valid)
        if monitor == "roc_auc":
            return float(batched_macro_roc_auc(data.valid.labels.to(device), logits.unsqueeze(0))[0])
        return float(F.binary_cross_entropy_with_logits(logits.double(), data.valid.labels.to(device).double()))

    sign = 1.0 if monitor == "roc_auc" else -1.0  # compare as "higher is better"
    best_value, best_epoch, best_state, stop_best, wait, epochs_run, steps = math.nan, 0, None, -math.inf, 0, 0, 0
    best_score = -math.inf
    for epoch in range(1, settings.max_epochs + 1):
        for x, y in batches():
            mask = streams.dropout_mask(x.shape[0], settings.hidden, settings.dropout)
            loss = F.binary_cross_entropy_with_logits(model(x, mask), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        epochs_run = epoch
        value = monitored()
        if sign * value > best_score:
            best_score, best_value, best_epoch = sign * value, value, epoch
            best_state = copy.deepcopy(model.state_dict())
        scheduler.step(value)
        if sign * value > stop_best:
            stop_best, wait = sign * value, 0
        else:
            wait += 1
        if wait >= settings.patience or not math.isfinite(value):
            break
    final_lr = optimizer.param_groups[0]["lr"]
    if best_state is not None:
        model.load_state_dict(best_state)
    else:  # no epoch had a finite validation value: the initial weights stand, and the probe is never selected
        with torch.no_grad():
            model.fc1.weight.copy_(init["w1"].T)
            model.fc1.bias.copy_(init["b1"])
            model.fc2.weight.copy_(init["w2"].T)
            model.fc2.bias.copy_(init["b2"])
            if spec.layer == WEIGHTED:
                model.layer_logits.copy_(init["layer_logits"])
    valid_logits = split_logits(data.valid).cpu()
    valid = tagging_scores(data.valid.labels, valid_logits, data.vocabulary, settings.threshold).as_dict()
    valid["loss"] = float(F.binary_cross_entropy_with_logits(valid_logits.double(), data.valid.labels.double()))
    test = None
    if evaluate_test and data.test is not None:
        test_logits = split_logits(data.test).cpu()
        test = tagging_scores(data.test.labels, test_logits, data.vocabulary, settings.threshold).as_dict()
        test["loss"] = float(F.binary_cross_entropy_with_logits(test_logits.double(), data.test.labels.double()))
    weights = torch.softmax(model.layer_logits.detach().double(), -1).cpu().tolist() if spec.layer == WEIGHTED else None
    return ProbeOutcome(spec, best_epoch, epochs_run, best_value, float(final_lr), valid, test, weights, steps)
