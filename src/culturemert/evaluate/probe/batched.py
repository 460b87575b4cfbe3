"""The batched probe trainer: every probe of a sweep trained at once as one model.

Batching. The parameters of all P probes are stacked along a leading dimension and trained with ``bmm``;
Adam is elementwise, so one Adam over the stacked tensors *is* per-probe Adam once the learning rate is a
per-probe tensor. ReduceLROnPlateau, early stopping and checkpointing are per-probe state vectors; stopped
probes are removed from the stack at the end of the epoch. The backward pass of the two-layer MLP is written out
(:func:`_loss_gradients`, checked against autograd in the tests) so that gradients and step temporaries live in
reused buffers: autograd would allocate ~2 GB per step for a 390-probe MTAT sweep, and on CPU the page faults of
those fresh allocations cost as much as the arithmetic. Randomness is drawn per seed, not per probe: all
probes that share a seed share their initial MLP weights, their data order and their dropout masks (common
random numbers across layers and learning rates). Seeds differ in their data order, so under track batching
their batches hold different numbers of windows: a step pads every seed's batch to the longest and masks the
padding out of the loss. A probe trained alone with the same seed sees exactly the same numbers, which
:func:`train_probe_reference` (plain ``nn.Linear`` + ``torch.optim.Adam`` + ``ReduceLROnPlateau``) proves in
the tests for every protocol.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from culturemert.errors import ConfigError, DataError
from culturemert.evaluate.features import ProbeData, SplitFeatures
from culturemert.runtime import resolve_device
from culturemert.evaluate.metrics import batched_macro_roc_auc, tagging_scores, valid_tag_mask
from culturemert.evaluate.probe.settings import WEIGHTED, ProbeOutcome, ProbeSettings, ProbeSpec, weighted_sum_layers
from culturemert.evaluate.probe.streams import SeedStreams, epoch_rows, initial_weights

log = logging.getLogger(__name__)


class _Workspace:
    """Step buffers reused across steps. On CPU a fresh multi-megabyte tensor per step costs page faults that rival
    the arithmetic itself (a 390-probe sweep allocates ~2 GB per step otherwise), so every large temporary of the
    training step lives here; a request returns a view of a flat buffer that only grows."""

    def __init__(self, device: torch.device):
        self.device = device
        self._flat: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._flat.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._flat[name] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(*shape)


class _ProbeStack:
    """Stacked parameters, gradients and Adam state of the active probes."""

    def __init__(self, params: dict[str, torch.Tensor], workspace: _Workspace):
        self.params = {k: v.clone() for k, v in params.items()}
        self.exp_avg = {k: torch.zeros_like(v) for k, v in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in params.items()}
        self.workspace = workspace

    def grad(self, name: str) -> torch.Tensor:
        return self.workspace(f"grad.{name}", self.params[name].shape)

    def select(self, keep: torch.Tensor) -> None:
        for store in (self.params, self.exp_avg, self.exp_avg_sq):
            for k in store:
                store[k] = store[k][keep]


def _forward(
    params: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    dropout_masks: torch.Tensor | None,
) -> torch.Tensor:
    """inputs [P, B, D] -> logits [P, B, K]."""
    h = torch.baddbmm(params["b1"].unsqueeze(1), inputs, params["w1"]).relu()
    if dropout_masks is not None:
        h = h * dropout_masks
    return torch.baddbmm(params["b2"].unsqueeze(1), h, params["w2"])


def _loss_gradients(
    stack: _ProbeStack,
    inputs: torch.Tensor,
    weighted_inputs: torch.Tensor | None,
    dropout_masks: torch.Tensor | None,
    targets: torch.Tensor,
    n_single: int,
    denominator: int | torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    accumulate: bool = False,
) -> None:
    """Forward + backward of every probe's mean BCE, written out so each gradient lands in a reused buffer.

    ``inputs`` [P, B, D] are the probe inputs (rows n_single.. are the weighted sums of ``weighted_inputs``
    [P - n_single, B, Lw, D]); ``targets`` [P, B, K]. The loss of a probe is the sum of its per-element BCE over
    the rows where ``row_mask`` [P, B, 1] is 1 (all rows when None), divided by ``denominator`` (an int, or [P,
    1, 1]; default B * K, i.e. the mean). With ``accumulate`` the gradients are added to those already in the
    buffers (a step split into row blocks). The operations and their order are those autograd runs for
    :func:`_forward` + ``binary_cross_entropy_with_logits`` (mean), so the numbers agree with the reference
    probe to float rounding (tested); autograd itself would allocate every gradient afresh each step.
    """
    p, ws = stack.params, stack.workspace
    n_probes, batch, _ = inputs.shape
    hidden = p["w1"].shape[2]

    def grad_out(name: str) -> torch.Tensor:
        return ws(f"block.{name}", p[name].shape) if accumulate else stack.grad(name)

    pre = torch.baddbmm(p["b1"].unsqueeze(1), inputs, p["w1"], out=ws("pre", (n_probes, batch, hidden)))
    h = torch.clamp_min(pre, 0, out=ws("h", pre.shape))  # relu
    if dropout_masks is not None:
        h.mul_(dropout_masks)
    logits = torch.baddbmm(p["b2"].unsqueeze(1), h, p["w2"])
    dlogits = logits.sigmoid_().sub_(targets)
    if row_mask is not None:
        dlogits.mul_(row_mask)  # padding rows of a shorter batch contribute nothing
    dlogits.div_(denominator if denominator is not None else logits.shape[1] * logits.shape[2])
    names = ["b2", "w2", "b1", "w1"]
    torch.sum(dlogits, 1, out=grad_out("b2"))
    torch.bmm(h.transpose(1, 2), dlogits, out=grad_out("w2"))
    dh = torch.bmm(dlogits, p["w2"].transpose(1, 2), out=ws("dh", pre.shape))
    if dropout_masks is not None:
        dh.mul_(dropout_masks)
    dh.masked_fill_(torch.le(pre, 0, out=ws("relu_off", pre.shape, torch.bool)), 0.0)
    torch.sum(dh, 1, out=grad_out("b1"))
    torch.bmm(inputs.transpose(1, 2), dh, out=grad_out("w1"))
    if weighted_inputs is not None:
        d_inputs = torch.bmm(dh[n_single:], p["w1"][n_single:].transpose(1, 2))
        d_weights = torch.einsum("pbd,pbld->pl", d_inputs, weighted_inputs)
        weights = torch.softmax(p["layer_logits"][n_single:], dim=-1)
        grad_logits = grad_out("layer_logits")
        grad_logits[:n_single] = 0.0
        grad_logits[n_single:] = weights * (d_weights - (d_weights * weights).sum(-1, keepdim=True))
        names.append("layer_logits")
    if accumulate:
        for name in names:
            stack.grad(name).add_(ws(f"block.{name}", p[name].shape))


def _adam_step(stack: _ProbeStack, names: Sequence[str], lr_over_bc1: torch.Tensor, bc2_sqrt: float,
               betas: tuple[float, float], eps: float) -> None:
    """torch.optim.Adam's single-tensor update with a per-probe learning rate, in place; the gradient buffer
    doubles as the scratch space for the denominator (it is not needed once the moments are updated)."""
    beta1, beta2 = betas
    for name in names:
        param, grad = stack.params[name], stack.grad(name)
        m, v = stack.exp_avg[name], stack.exp_avg_sq[name]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = torch.sqrt(v, out=grad).div_(bc2_sqrt).add_(eps)
        update = torch.div(m, denom, out=denom)
        update.mul_(lr_over_bc1.view(-1, *([1] * (param.dim() - 1))))
        param.sub_(update)


def _probe_inputs(
    x: torch.Tensor,
    single_layer: torch.Tensor,
    n_single: int,
    layer_logits: torch.Tensor,
    ws_layers: torch.Tensor,
) -> torch.Tensor:
    """Input vectors [P, B, D] of every probe for evaluation chunks ``x`` [B, L, D] shared by all probes.

    Probes 0..n_single-1 read one layer; the rest a softmax-weighted sum over ``ws_layers``. (Training batches,
    which differ per seed, go through :func:`_training_inputs`.)
    """
    parts = []
    if n_single:
        parts.append(x[:, single_layer, :].transpose(0, 1))
    if layer_logits.shape[0] > n_single:
        weights = torch.softmax(layer_logits[n_single:], dim=-1)
        parts.append(torch.einsum("pl,bld->pbd", weights, x[:, ws_layers, :]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _training_inputs(
    xb: torch.Tensor,
    row_of_probe: torch.Tensor,
    single_layer: torch.Tensor,
    n_single: int,
    layer_logits: torch.Tensor,
    ws_layers: torch.Tensor,
    workspace: _Workspace,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The [P, B, D] inputs of one training batch (``xb`` [S, B, L, D] holds each seed's batch) gathered into a
    reused buffer, and the [P_w, B, L_w, D] layers the weighted-sum probes mix (None when there are none)."""
    seeds, batch, num_layers, dim = xb.shape
    n_probes = row_of_probe.shape[0]
    inputs = workspace("inputs", (n_probes, batch, dim))
    if n_single:
        by_seed_layer = xb.transpose(1, 2).reshape(seeds * num_layers, batch, dim)
        torch.index_select(by_seed_layer, 0, row_of_probe[:n_single] * num_layers + single_layer, out=inputs[:n_single])
    if n_single == n_probes:
        return inputs, None
    weighted_inputs = xb[:, :, ws_layers, :][row_of_probe[n_single:]]
    weights = torch.softmax(layer_logits[n_single:], dim=-1)
    inputs[n_single:] = torch.einsum("pl,pbld->pbd", weights, weighted_inputs)
    return inputs, weighted_inputs


@torch.no_grad()
def track_logits(
    params: dict[str, torch.Tensor],
    split: SplitFeatures,
    single_layer: torch.Tensor,
    n_single: int,
    ws_layers: torch.Tensor,
    device: torch.device,
    block_floats: int,
) -> torch.Tensor:
    """[P, N, K] track logits = mean of chunk logits (dropout off), computed block of tracks by block."""
    n_probes = params["w1"].shape[0]
    dim = split.features.shape[2]
    max_chunks = max(1, block_floats // max(1, n_probes * dim))
    out = torch.empty(n_probes, split.num_tracks, params["b2"].shape[1], device=device)
    starts = split.chunk_start.tolist()
    t0 = 0
    while t0 < split.num_tracks:
        t1 = t0 + 1
        while t1 < split.num_tracks and starts[t1 + 1] - starts[t0] <= max_chunks:
            t1 += 1
        c0, c1 = starts[t0], starts[t1]
        x = split.features[c0:c1].to(device, non_blocking=True)
        logits = _forward(params, _probe_inputs(x, single_layer, n_single, params["layer_logits"], ws_layers), None)
        # Averaging matrix instead of index_add: deterministic on GPU as well.
        owner = split.chunk_track[c0:c1].to(device) - t0
        avg = torch.zeros(t1 - t0, c1 - c0, device=device)
        avg[owner, torch.arange(c1 - c0, device=device)] = 1.0
        avg = avg / avg.sum(1, keepdim=True)
        out[:, t0:t1] = torch.matmul(avg, logits)
        t0 = t1
    return out


def bce_per_probe(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over tracks and tags for each probe: labels [N, K], logits [P, N, K] -> [P] float64."""
    y = labels.to(device=logits.device, dtype=torch.float64)
    out = []
    block = max(1, 2_000_000 // max(1, y.numel()))
    for p0 in range(0, logits.shape[0], block):
        part = logits[p0 : p0 + block].double()
        loss = F.binary_cross_entropy_with_logits(part, y.unsqueeze(0).expand_as(part), reduction="none")
        out.append(loss.mean(dim=(1, 2)).cpu())
    return torch.cat(out)


def metric_dicts(labels: torch.Tensor, logits: torch.Tensor, vocabulary: list[str], threshold: float):
    """Per probe: the tagging metrics of ``logits`` [P, N, K] against ``labels`` [N, K] and the tags excluded from
    ROC-AUC/AP (no positive or no negative)."""
    results, excluded = [], []
    y = labels.double().cpu()
    losses = bce_per_probe(labels, logits)
    for p in range(logits.shape[0]):
        scores = tagging_scores(y, logits[p].double().cpu(), vocabulary, threshold)
        results.append({**scores.as_dict(), "loss": float(losses[p])})
        excluded = scores.excluded_tags
    return results, excluded


def tag_list(tags: Sequence[str], limit: int = 5) -> str:
    """At most ``limit`` tag names, comma-separated, with a count of the rest (for error messages)."""
    return ", ".join(tags[:limit]) + (f", ... ({len(tags)} in all)" if len(tags) > limit else "")


def validation_monitor(data: ProbeData, settings: ProbeSettings) -> str:
    """What epochs, learning rates and layers are selected on: ``"roc_auc"`` (MARBLE; with ``selection_metric``
    for the grid) or, only when the user set ``validation_fallback: valid_loss``, ``"valid_loss"``.

    Raises :class:`DataError` naming the split and its tags when no validation tag has both a positive and a
    negative example: validation ROC-AUC and AP are then undefined for every probe, and any "selection" would
    be the first grid entry presented as a validation choice.
    """
    labels = data.valid.labels
    if bool(valid_tag_mask(labels).any()):
        return "roc_auc"
    if settings.validation_fallback == "valid_loss":
        return "valid_loss"
    positives = labels.sum(0)
    everywhere = [t for t, n in zip(data.vocabulary, positives.tolist()) if n == labels.shape[0]]
    nowhere = [t for t, n in zip(data.vocabulary, positives.tolist()) if n == 0]
    detail = "; ".join(
        part for part in (f"positive on every track: {tag_list(everywhere)}" if everywhere else "",
                          f"no positive: {tag_list(nowhere)}" if nowhere else "") if part
    )
    raise DataError(
        f"{data.dataset or 'features'}: the valid split ({data.valid.num_tracks} tracks) has no tag with both a "
        f"positive and a negative example ({detail}), so validation ROC-AUC/AP are undefined and cannot choose "
        "the epoch, learning rate or layer; fix the split, or set validation_fallback: valid_loss to select on "
        "the validation BCE loss instead"
    )


def train_probes(
    data: ProbeData,
    specs: Sequence[ProbeSpec],
    settings: ProbeSettings,
    *,
    progress: bool = True,
    evaluate_test: bool = True,
) -> tuple[list[ProbeOutcome], dict[str, list[str]]]:
    """Train every probe of ``specs`` together; returns one outcome per spec (same order) and the tags
    excluded from macro ROC-AUC/AP per split. Raises :class:`DataError` when validation cannot rank the probes
    (see :func:`validation_monitor`)."""
    from tqdm.auto import tqdm

    monitor = validation_monitor(data, settings)
    device = resolve_device(settings.device)
    num_layers, dim, num_tags = data.num_layers, data.dim, data.num_tags
    ws_list = weighted_sum_layers(settings, num_layers)
    # internal order: single-layer probes first, then weighted ones
    order = sorted(range(len(specs)), key=lambda i: specs[i].layer == WEIGHTED)
    internal = [specs[i] for i in order]
    n_single = sum(1 for s in internal if s.layer != WEIGHTED)
    seeds = sorted({s.seed for s in internal})
    seed_row = torch.tensor([seeds.index(s.seed) for s in internal], dtype=torch.long)
    single_layer = torch.tensor([int(s.layer) for s in internal[:n_single]], dtype=torch.long)
    for layer in single_layer.tolist():
        if not 0 <= layer < num_layers:
            raise ConfigError(f"layer {layer} out of range 0..{num_layers - 1}")
    init = {s: initial_weights(s, dim, settings.hidden, num_tags, len(ws_list)) for s in seeds}
    params = {k: torch.stack([init[s.seed][k] for s in internal]).to(device) for k in init[seeds[0]]}
    workspace = _Workspace(device)
    stack = _ProbeStack(params, workspace)
    n_total = len(internal)
    ids = torch.arange(n_total)  # original (internal) index of each active probe
    lr = torch.tensor([s.lr for s in internal], dtype=torch.float64)
    # every monitored value is a score, higher = better (the loss enters negated), so one set of rules serves both
    plateau_best = torch.full((n_total,), -math.inf, dtype=torch.float64)
    plateau_bad = torch.zeros(n_total, dtype=torch.long)
    stop_best = torch.full((n_total,), -math.inf, dtype=torch.float64)
    stop_wait = torch.zeros(n_total, dtype=torch.long)
    best_score = torch.full((n_total,), -math.inf, dtype=torch.float64)
    best_epoch = torch.zeros(n_total, dtype=torch.long)
    epochs_run = torch.zeros(n_total, dtype=torch.long)
    final_lr = lr.clone()
    best_params = {k: v.detach().clone() for k, v in stack.params.items()}
    streams = [SeedStreams(s, device) for s in seeds]

    train_x = data.train.features.to(device)
    train_y = data.train.labels.to(device=device, dtype=torch.float32)[data.train.chunk_track.to(device)]
    valid_labels = data.valid.labels
    ws_layers = torch.tensor(ws_list, dtype=torch.long, device=device)
    single_dev = single_layer.to(device)
    beta1, beta2 = settings.adam_betas
    step = 0
    steps_per_epoch = 0
    bar = tqdm(total=settings.max_epochs, desc=f"probe x{n_total}", unit="epoch", disable=not progress)
    for epoch in range(1, settings.max_epochs + 1):
        plans = [epoch_rows(settings.batching, data.train, st, settings.batch_size) for st in streams]
        steps_per_epoch = len(plans[0])
        rows = seed_row[ids].to(device)
        n_active = int(ids.numel())
        n_single_active = int((ids < n_single).sum())
        active_layers = single_dev[ids[:n_single_active].to(device)]
        lr_dev = lr[ids].to(device=device, dtype=torch.float32)
        # layer logits train only while weighted-sum probes are active (autograd: zero rows for single-layer probes)
        trained = ["w1", "b1", "w2", "b2"] + (["layer_logits"] if n_single_active < n_active else [])
        floats_per_row = n_active * max(dim, settings.hidden) + (n_active - n_single_active) * len(ws_list) * dim
        block_rows = max(1, settings.train_block_floats // floats_per_row)
        for b in range(steps_per_epoch):
            seed_rows = [plan[b] for plan in plans]
            sizes = [int(r.numel()) for r in seed_rows]
            width = max(sizes)
            masks = None
            if settings.dropout > 0:
                masks = [st.dropout_mask(n, settings.hidden, settings.dropout) for st, n in zip(streams, sizes)]
            if min(sizes) == width:  # every seed's batch has the same size: no padding
                idx = torch.stack(seed_rows).to(device)
                valid_rows = None
                denominator: int | torch.Tensor = width * num_tags
                drop_all = torch.stack(masks) if masks is not None else None  # type: ignore[arg-type]
            else:
                # seeds visit tracks in different orders, so under track batching their batches hold different
                # numbers of windows: pad to the longest and mask the padding out of the loss
                idx = torch.zeros(len(seeds), width, dtype=torch.long)
                valid_seed = torch.zeros(len(seeds), width, 1)
                for s_i, r in enumerate(seed_rows):
                    idx[s_i, : r.numel()] = r
                    valid_seed[s_i, : r.numel()] = 1.0
                idx, valid_seed = idx.to(device), valid_seed.to(device)
                valid_rows = torch.index_select(valid_seed, 0, rows)
                counts = torch.tensor(sizes, dtype=torch.float32, device=device) * num_tags
                denominator = counts[rows].view(-1, 1, 1)
                drop_all = None
                if masks is not None:
                    drop_all = torch.zeros(len(seeds), width, settings.hidden, device=device)
                    for s_i, m in enumerate(masks):
                        drop_all[s_i, : m.shape[0]] = m  # type: ignore[union-attr]
            for r0 in range(0, width, block_rows):
                cols = idx[:, r0 : r0 + block_rows]  # [S, b]
                xb, yb = train_x[cols], train_y[cols]
                batch = cols.shape[1]
                drop = None
                if drop_all is not None:
                    drop = torch.index_select(drop_all[:, r0 : r0 + block_rows], 0, rows,
                                              out=workspace("dropout", (rows.shape[0], batch, settings.hidden)))
                inputs, weighted_inputs = _training_inputs(
                    xb, rows, active_layers, n_single_active, stack.params["layer_logits"], ws_layers, workspace
                )
                targets = torch.index_select(yb, 0, rows, out=workspace("targets", (rows.shape[0], batch, num_tags)))
                row_mask = None if valid_rows is None else valid_rows[:, r0 : r0 + block_rows]
                _loss_gradients(stack, inputs, weighted_inputs, drop, targets, n_single_active, denominator, row_mask,
                                accumulate=r0 > 0)
            step += 1
            bc1 = 1 - beta1**step
            _adam_step(stack, trained, lr_dev / bc1, math.sqrt(1 - beta2**step), settings.adam_betas,
                       settings.adam_eps)
        # ---- end of epoch: validation, checkpoint, plateau, early stopping
        score = _valid_scores(stack.params, data.valid, active_layers, n_single_active, ws_layers, device, settings,
                              monitor)
        finite = torch.isfinite(score)
        epochs_run[ids] = epoch
        improved = score > best_score[ids]  # NaN never improves (Lightning's ModelCheckpoint)
        if improved.any():
            sel = improved.nonzero().squeeze(1)
            for k in best_params:
                best_params[k][ids[sel].to(device)] = stack.params[k].detach()[sel.to(device)]
            best_score[ids[sel]] = score[sel]
            best_epoch[ids[sel]] = epoch
        # ReduceLROnPlateau (torch semantics, relative threshold, cooldown 0): mode max on the AUC beats
        # best * (1 + t); mode min on the loss beats loss_best * (1 - t), i.e. score > -(-best * (1 - t))
        if monitor == "roc_auc":
            bar_to_beat = plateau_best[ids] * (1.0 + settings.lr_threshold)
        else:
            bar_to_beat = -((-plateau_best[ids]) * (1.0 - settings.lr_threshold))
        better = score > bar_to_beat
        plateau_best[ids] = torch.where(better, score, plateau_best[ids])
        plateau_bad[ids] = torch.where(better, torch.zeros_like(plateau_bad[ids]), plateau_bad[ids] + 1)
        reduce = plateau_bad[ids] > settings.lr_patience
        if reduce.any():
            old = lr[ids]
            new = torch.clamp(old * settings.lr_factor, min=settings.min_lr)
            apply = reduce & (old - new > 1e-8)
            lr[ids] = torch.where(apply, new, old)
            plateau_bad[ids] = torch.where(reduce, torch.zeros_like(plateau_bad[ids]), plateau_bad[ids])
        final_lr[ids] = lr[ids]
        # EarlyStopping (Lightning semantics: strict improvement, stop when wait >= patience; a non-finite monitored
        # value stops the probe at once, as Lightning's check_finite does)
        es_improved = score > stop_best[ids]
        stop_best[ids] = torch.where(es_improved, score, stop_best[ids])
        stop_wait[ids] = torch.where(es_improved, torch.zeros_like(stop_wait[ids]), stop_wait[ids] + 1)
        keep = (stop_wait[ids] < settings.patience) & finite
        bar.update(1)
        bar.set_postfix(active=int(keep.sum()), best=f"{float(best_score.max()):.4f}")
        if not keep.all():
            ids = ids[keep]
            stack.select(keep.to(device))
        if ids.numel() == 0:
            break
    bar.close()

    # ---- evaluate every probe's best checkpoint
    valid_logits = track_logits(best_params, data.valid, single_dev, n_single, ws_layers, device, settings.eval_block_floats)
    valid_metrics, valid_excluded = metric_dicts(valid_labels, valid_logits, data.vocabulary, settings.threshold)
    excluded = {"valid": valid_excluded}
    test_metrics: list[dict[str, float] | None] = [None] * n_total
    if evaluate_test and data.test is not None:
        test_logits = track_logits(best_params, data.test, single_dev, n_single, ws_layers, device, settings.eval_block_floats)
        tm, excluded["test"] = metric_dicts(data.test.labels, test_logits, data.vocabulary, settings.threshold)
        test_metrics = list(tm)
    layer_weights = torch.softmax(best_params["layer_logits"].double(), dim=-1).cpu()
    reported = best_score if monitor == "roc_auc" else -best_score
    reported = torch.where(best_epoch > 0, reported, torch.full_like(reported, math.nan))
    outcomes_internal = []
    for i, spec in enumerate(internal):
        outcomes_internal.append(
            ProbeOutcome(
                spec=spec,
                best_epoch=int(best_epoch[i]),
                epochs_run=int(epochs_run[i]),
                best_valid_score=float(reported[i]),
                final_lr=float(final_lr[i]),
                valid=valid_metrics[i],
                test=test_metrics[i],
                layer_weights=layer_weights[i].tolist() if spec.layer == WEIGHTED else None,
                optimizer_steps=int(epochs_run[i]) * steps_per_epoch,
            )
        )
    outcomes: list[ProbeOutcome] = [None] * len(specs)  # type: ignore[list-item]
    for pos, original in enumerate(order):
        outcomes[original] = outcomes_internal[pos]
    return outcomes, excluded


def _valid_scores(params, split, single_layers, n_single, ws_layers, device, settings, monitor: str) -> torch.Tensor:
    """[P] float64 monitored validation score per active probe, higher = better: macro ROC-AUC, or the negated
    validation BCE loss under the valid_loss fallback. NaN where undefined (a diverged probe)."""
    logits = track_logits(
        {k: v.detach() for k, v in params.items()}, split, single_layers, n_single, ws_layers, device,
        settings.eval_block_floats,
    )
    if monitor == "valid_loss":
        return -bce_per_probe(split.labels, logits)
    labels = split.labels.to(device)
    chunks = []
    block = max(1, 2_000_000 // max(1, labels.numel()))
    for p0 in range(0, logits.shape[0], block):
        chunks.append(batched_macro_roc_auc(labels, logits[p0 : p0 + block]).cpu())
    return torch.cat(chunks)
