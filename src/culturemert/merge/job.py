"""A whole merge job on model sources: open the inputs (loaded as models, or read lazily from exports), merge them
tensor by tensor, and write an export whose model card records the merge."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from culturemert.errors import UserError
from culturemert.merge.engine import in_scope, merge_with_report
from culturemert.merge.options import DISJOINT_METHODS, SPECTRAL_METHODS, MergeOptions, _options_from

log = logging.getLogger(__name__)

HEADS_PREFIX = "heads."


@dataclass
class LoadedInputs:
    """Base and input models, opened once (a sweep merges them many times).

    ``base_state``/``states`` are ``MertPretrainModel.state_dict()``-named mappings: real state dicts of loaded
    models, or lazy readers of export files (one tensor read per access) when every input is a culturemert
    export; ``make_output(with_heads)`` returns the skeleton the merged tensors are assigned into.
    """

    base_source: str | None  # None: linear averaging without a base (the first model is the template)
    base_state: Mapping[str, torch.Tensor] | None
    base_fingerprint: str | None
    sources: list[str]
    states: list[Mapping[str, torch.Tensor]]
    fingerprints: list[str]
    heads_merged: bool
    make_output: Callable[[bool], Any]
    lazy: bool = False


def _recorded_base_fingerprint(source: str) -> str | None:
    path = Path(source)
    if not path.is_dir():
        return None
    from culturemert.model import read_export_metadata

    meta = read_export_metadata(path)  # {} for a plain HF directory: nothing recorded
    value = meta.get("base_fingerprint") if isinstance(meta, Mapping) else None
    return str(value) if value else None


def _check_same_rate(labelled: Sequence[tuple[Any, Any]]) -> None:
    """Models made for different input rates (MERT-v0 at 16 kHz, MERT-v1 at 24 kHz) share no weight space."""
    rates = [(str(source), int(getattr(model, "sample_rate"))) for source, model in labelled]
    for source, rate in rates[1:]:
        if rate != rates[0][1]:
            raise UserError(
                f"{source} runs at {rate} Hz but {rates[0][0]} at {rates[0][1]} Hz; models for different sample rates "
                "cannot be merged"
            )


def _check_recorded_bases(base_source: Any, base_fp: str | None, model_sources: Sequence[Any], allow_unrelated: bool) -> None:
    for source in model_sources if base_source is not None else ():
        recorded = _recorded_base_fingerprint(str(source))
        if recorded is not None and recorded != base_fp:
            message = (
                f"{source} records that it was trained from a model with fingerprint {recorded[:16]}…, but the base "
                f"{base_source} has fingerprint {(base_fp or '?')[:16]}…; pass the model it was trained from as --base, "
                "or --allow-unrelated to merge anyway"
            )
            if not allow_unrelated:
                raise UserError(message)
            log.warning("%s", message)


def _heads_merged(base_has_heads: bool, inputs_have_heads: Sequence[bool]) -> bool:
    every_has_heads = base_has_heads and all(inputs_have_heads)
    if not every_has_heads and (base_has_heads or any(inputs_have_heads)):
        log.warning("not every input has pre-training heads: merging the backbone only; the output has no heads")
    return every_has_heads


def load_inputs(
    base_source: str | Path | None, model_sources: Sequence[str | Path], *, allow_unrelated: bool = False
) -> LoadedInputs:
    """Load base and inputs with ``culturemert.model.load_model`` and check recorded base fingerprints.

    ``base_source=None`` is for linear averaging only: the first model then serves as the output's template.
    """
    import copy

    from culturemert.model import load_model, model_fingerprint

    if not model_sources:
        raise UserError("merge needs at least one model (--models)")
    models, fingerprints = [], []
    for source in model_sources:
        model = load_model(str(source))
        models.append(model)
        fingerprints.append(model_fingerprint(model))
    base = load_model(str(base_source)) if base_source is not None else models[0]
    base_fp = model_fingerprint(base) if base_source is not None else None
    _check_same_rate(([(base_source, base)] if base_source is not None else []) + list(zip(model_sources, models)))
    _check_recorded_bases(base_source, base_fp, model_sources, allow_unrelated)

    def make_output(with_heads: bool) -> Any:
        output = copy.deepcopy(base)
        if not with_heads:
            output.heads = None
        return output

    return LoadedInputs(
        base_source=str(base_source) if base_source is not None else None,
        base_state=base.state_dict() if base_source is not None else None,
        base_fingerprint=base_fp,
        sources=[str(s) for s in model_sources],
        states=[m.state_dict() for m in models],
        fingerprints=fingerprints,
        heads_merged=_heads_merged(base.heads is not None, [m.heads is not None for m in models]),
        make_output=make_output,
    )


def open_inputs_lazily(
    base_source: str | Path | None, model_sources: Sequence[str | Path], *, allow_unrelated: bool = False
) -> LoadedInputs:
    """Like :func:`load_inputs` for culturemert exports, without loading any weights: the merge then reads one
    tensor per input at a time, so its peak memory is about the output model instead of n + 2 models. Every
    file's sha256 is checked against the export record first (that is what makes the recorded fingerprints
    trustworthy)."""
    from culturemert.model import LazyExport

    if not model_sources:
        raise UserError("merge needs at least one model (--models)")
    exports = [LazyExport(source) for source in model_sources]
    base = LazyExport(base_source) if base_source is not None else exports[0]
    for export in ([base] if base_source is not None else []) + exports:
        if not export.fingerprint:
            raise UserError(f"{export.directory}: the export records no fingerprint; re-export it with culturemert")
    base_fp = base.fingerprint if base_source is not None else None
    _check_same_rate(([(base_source, base)] if base_source is not None else []) + list(zip(model_sources, exports)))
    _check_recorded_bases(base_source, base_fp, model_sources, allow_unrelated)
    return LoadedInputs(
        base_source=str(base_source) if base_source is not None else None,
        base_state=base.state if base_source is not None else None,
        base_fingerprint=base_fp,
        sources=[str(s) for s in model_sources],
        states=[e.state for e in exports],
        fingerprints=[str(e.fingerprint) for e in exports],
        heads_merged=_heads_merged(base.has_heads, [e.has_heads for e in exports]),
        make_output=base.empty_model,
        lazy=True,
    )


class _WithoutHeads(Mapping[str, torch.Tensor]):
    """A state mapping minus the pre-training heads (a view: lazy mappings stay lazy)."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self._state = state
        self._names = [k for k in state if not k.startswith(HEADS_PREFIX)]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name.startswith(HEADS_PREFIX):
            raise KeyError(name)
        return self._state[name]

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return isinstance(name, str) and not name.startswith(HEADS_PREFIX) and name in self._state

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _state_for_merge(state: Mapping[str, torch.Tensor], with_heads: bool) -> Mapping[str, torch.Tensor]:
    return state if with_heads else _WithoutHeads(state)


def _lambda_placement(method: str) -> str:
    if method in DISJOINT_METHODS:
        return "after the disjoint mean (not in sign election; see arcee-ai/mergekit#474)"
    if method in SPECTRAL_METHODS:
        return "theta_base + alpha * merged update (alpha = lambda, one for all models)"
    if method == "linear":
        return "per-model weights, normalised"
    if method == "breadcrumbs":
        return "theta_base + sum_i lambda_i (m_i * tau_i), m_i the breadcrumbs mask"
    return "theta_base + sum_i lambda_i tau_i"


def merge_loaded(
    inputs: LoadedInputs,
    out_dir: str | Path,
    options: MergeOptions,
    *,
    card_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge opened inputs and write an export to ``out_dir``; returns the merge record of the card."""
    from culturemert.model import model_fingerprint, save_export

    with_heads = inputs.heads_merged
    merged, report = merge_with_report(
        _state_for_merge(inputs.base_state, with_heads) if inputs.base_state is not None else None,
        [_state_for_merge(state, with_heads) for state in inputs.states],
        options,
        model_labels=inputs.sources,
        base_label=f"the base ({inputs.base_source})",
    )
    output = inputs.make_output(with_heads)
    # assign=True adopts the merged tensors (and their dtype) instead of copying them into the template.
    output.load_state_dict(merged, strict=True, assign=True)
    del merged
    heads_in_scope = with_heads and any(
        in_scope(name, options.include, options.exclude) for name in report.merged if name.startswith(HEADS_PREFIX)
    )
    record: dict[str, Any] = {
        "method": options.method,
        "lambdas": report.lambdas,
        "lambda_placement": _lambda_placement(options.method),
        "weights": report.weights,
        "hyperparameters": report.hyperparameters,
        "options": options.model_dump(),
        "scope": {
            "include": list(options.include),
            "exclude": list(options.exclude),
            "heads_merged": heads_in_scope,
            "num_merged_tensors": len(report.merged),
            "num_kept_from_base": len(report.kept_from_base),
        },
        "seed": options.seed if "seed" in report.hyperparameters else None,
        # trim_scope global: per input, the magnitude band kept over the whole model (upper None: no upper bound)
        "global_trim_bands": (
            [None if b is None else {"lower": b[0], "upper": None if math.isinf(b[1]) else b[1]} for b in report.global_bands]
            if report.global_bands is not None
            else None
        ),
        "base": (
            {"source": inputs.base_source, "fingerprint": inputs.base_fingerprint} if inputs.base_source else None
        ),
        "inputs": [
            {"source": s, "fingerprint": fp, "task_vector_ratio": r}
            for s, fp, r in zip(
                inputs.sources,
                inputs.fingerprints,
                report.task_vector_ratios or [None] * len(inputs.sources),
                strict=True,
            )
        ],
        "fingerprint": model_fingerprint(output),
    }
    card: dict[str, Any] = {"merge": record}
    if card_extra:
        card.update(card_extra)
    # The merge derives from the base like its inputs did, so a merged model can itself be merged on that base.
    base_fingerprint = inputs.base_fingerprint
    if inputs.base_source is None:
        # Linear averaging without --base: inherit the inputs' recorded base when they all agree on one.
        recorded = {_recorded_base_fingerprint(source) for source in inputs.sources}
        base_fingerprint = recorded.pop() if len(recorded) == 1 else None
    save_export(output, str(out_dir), card=card, base_fingerprint=base_fingerprint)
    log.info("merged %d models (%s) into %s", len(inputs.states), options.method, out_dir)
    return record


def merge_models(
    base_source: str | Path | None,
    model_sources: Sequence[str | Path],
    out_dir: str | Path,
    options: MergeOptions | None = None,
    *,
    card_extra: Mapping[str, Any] | None = None,
    **option_kwargs: Any,
) -> dict[str, Any]:
    """Load ``base_source`` and ``model_sources`` (any format ``load_model`` reads), merge, write an export.

    ``base_source`` may be None for ``linear`` only. The backbone is always merged; the pre-training heads are merged when every input and the base have them (and
    the scope includes them), otherwise the output has no heads. Returns the merge record stored in the card.
    """
    from culturemert.model import can_open_lazily

    opts = _options_from(options, **option_kwargs)
    sources = ([base_source] if base_source is not None else []) + list(model_sources)
    if model_sources and all(can_open_lazily(s) for s in sources):
        inputs = open_inputs_lazily(base_source, model_sources, allow_unrelated=opts.allow_unrelated)
    else:
        inputs = load_inputs(base_source, model_sources, allow_unrelated=opts.allow_unrelated)
    return merge_loaded(inputs, out_dir, opts, card_extra=card_extra)
