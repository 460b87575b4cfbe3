"""Label-free selection of the merge method and λ, and the merge-vs-mix report.

A merge has two choices no formula fixes: the method and λ. Probing on tagged validation data
(``culturemert merge --sweep ... --select-on eval.yaml``) needs tags for every culture; many traditions have none.
The teacher codes that ``culturemert prepare`` wrote for each culture's ``valid`` split need no tags, so the
merged model's **held-out masked-prediction loss** (:func:`culturemert.train.validation.evaluate_validation_set`,
the trainer's validation, on fixed crops and masks) scores every candidate without a label:

* objective: the mean over the new cultures (every validated culture except the protected one) of ``pred_loss``,
  nats per masked frame, lower is better;
* constraint: the protected culture's (Western) ``pred_loss`` may rise at most ``max_protected_increase`` nats
  above the base model's on the same crops; a candidate above that is not admissible (NaN counts as above);
* rule: argmin of the objective over admissible (method, λ); ties go to the smaller λ, then to the method given
  first. No admissible candidate is an error (the table is written first, so it shows why).

With probes as the criterion (``select_on="probe"``) the rule is the argmax of the mean probe metric, under the
same constraint whenever held-out loss is computed too. The merge-vs-mix report puts each method at its own
selected λ next to the multi-culture model trained on the same data (:func:`write_merge_vs_mix`).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from culturemert.config import StrictModel
from culturemert.errors import ConfigError, DataError, UserError
from culturemert.files import atomic_write_bytes, write_json_atomic
from culturemert.merge.options import METHOD_HYPERPARAMETERS, SUMMING_METHODS, MergeOptions
from culturemert.merge.sweep import format_lambda

log = logging.getLogger(__name__)

__all__ = [
    "SSL_METRIC",
    "LabelFreeSelection",
    "HeldOutLoss",
    "Candidate",
    "MethodSweepResult",
    "options_for_method",
    "select_candidate",
    "sweep_methods",
    "write_merge_vs_mix",
]

#: The held-out metric selection minimises: masked-prediction cross-entropy summed over codebooks (nats per frame).
SSL_METRIC = "pred_loss"
_STRICT = ("trim_scope", "gamma", "epsilon", "rank_fraction", "common_fraction")

Scores = dict[str, dict[str, float]]


class LabelFreeSelection(StrictModel):
    """How held-out loss is measured and what the protected culture may lose (``culturemert merge`` options)."""

    protected: str | None = None  # the culture whose loss is a constraint (e.g. western); None: no constraint
    max_protected_increase: float = Field(0.05, ge=0.0)  # nats per masked frame above the base's loss
    split: str = "valid"
    crops_per_culture: int = Field(32, ge=1)
    batch_clips: int = Field(8, ge=1)
    crop_seconds: float = Field(5.0, gt=0)
    seed: int = 0  # the recipe seed whose validation crops and masks are used (validation_seed(seed))


class HeldOutLoss:
    """Per-culture held-out masked-prediction metrics of any model on prepared directories' ``split`` items.

    The crops and masks are built once (:func:`culturemert.train.validation.prepared_validation_set` with
    ``validation_seed(seed)``), so every model scored by one instance sees the same crops and masks, and the
    numbers equal a training run's validation points for the same settings. Calling it with a model source
    returns :func:`~culturemert.train.validation.evaluate_validation_set`'s ``{culture: {metric: value}}``.

    Raises:
        DataError: a directory has no item in ``split``, the directories were prepared with teachers of different
            shapes, a requested culture has no held-out crops; at call time, a model without pre-training heads
            or whose heads predict a different number of codebooks / codebook size than the teacher wrote.
    """

    def __init__(
        self,
        prepared_dirs: Sequence[str | Path],
        *,
        cultures: Sequence[str] | None = None,
        split: str = "valid",
        crops_per_culture: int = 32,
        batch_clips: int = 8,
        crop_seconds: float = 5.0,
        seed: int = 0,
        objective: Any = None,
    ):
        from culturemert.data import PreparedDataset
        from culturemert.label_grid import crop_samples
        from culturemert.objective import MertObjective, ObjectiveConfig
        from culturemert.teachers import MertCQT
        from culturemert.train.validation import prepared_validation_set, validation_seed

        if not prepared_dirs:
            raise ConfigError("held-out loss needs at least one prepared directory (--prepared)")
        dirs = list(dict.fromkeys(str(d) for d in prepared_dirs))
        datasets = [PreparedDataset(d) for d in dirs]
        for d, ds in zip(dirs, datasets, strict=True):
            if not bool(((ds.split == split) & (ds.weight > 0)).any()):
                raise DataError(f"{d}: no items in split {split!r}; label-free selection scores held-out audio, "
                                f"so prepare this directory with a {split!r} split")
        shapes = {(ds.n_codebooks, ds.codebook_size) for ds in datasets}
        if len(shapes) > 1:
            raise DataError(f"the prepared directories were written by teachers of different shapes "
                            f"(n_codebooks, codebook_size) {sorted(shapes)}: {', '.join(dirs)}")
        self.dirs = dirs
        self.n_codebooks, self.codebook_size = shapes.pop()
        self.vset = prepared_validation_set(
            datasets, split=split, crops_per_culture=crops_per_culture, batch_clips=batch_clips,
            crop_samples=crop_samples(crop_seconds), seed=validation_seed(seed), cultures=cultures,
        )
        if cultures is not None and self.vset.missing:
            raise DataError("no held-out crops for " + "; ".join(f"{c} ({why})" for c, why in self.vset.missing.items()))
        if not self.vset.cultures:
            raise DataError(f"no held-out crops in split {split!r} of {', '.join(dirs)}: "
                            + "; ".join(f"{c}: {why}" for c, why in sorted(self.vset.missing.items())))
        config = objective or ObjectiveConfig()
        self.objective = MertObjective(config, MertCQT() if config.cqt_weight > 0 else None)
        self.cultures = sorted(self.vset.cultures)

    def check_model(self, model: Any, source: Any) -> None:
        if model.heads is None:
            raise DataError(f"{source}: no pre-training heads, cannot compute the masked-prediction loss")
        cfg = model.heads.config
        if (cfg.n_codebooks, cfg.codebook_size) != (self.n_codebooks, self.codebook_size):
            raise DataError(
                f"{source}: its heads predict {cfg.n_codebooks} codebooks of {cfg.codebook_size} codes but the "
                f"teacher of {self.dirs[0]} wrote {self.n_codebooks} of {self.codebook_size}; prepare the held-out "
                "audio with the models' teacher"
            )

    def evaluate_model(self, model: Any, source: Any = "the model") -> Scores:
        from culturemert.train.validation import evaluate_validation_set

        self.check_model(model, source)
        return evaluate_validation_set(model, self.objective, self.vset)

    def __call__(self, model_source: str | Path) -> Scores:
        from culturemert.model import load_model

        return self.evaluate_model(load_model(str(model_source)), model_source)


def options_for_method(data: Mapping[str, Any], method: str) -> MergeOptions:
    """``data`` (MergeOptions fields shared by a multi-method sweep) for one method: hyper-parameters the method
    does not use and ``mean`` for methods that already average are dropped, so one command line serves them all."""
    from culturemert.config import parse_config

    values = {k: v for k, v in data.items() if k not in ("method", "lambdas")}
    for name in _STRICT:
        if name not in METHOD_HYPERPARAMETERS[method]:
            values.pop(name, None)
    if method not in SUMMING_METHODS:
        values["mean"] = False
    if method == "linear":
        raise ConfigError("a λ sweep needs task-vector methods; 'linear' has weights, not λ")
    values["method"] = method
    return parse_config(values, MergeOptions, source=f"merge options for {method}")


@dataclass
class Candidate:
    """One merge of the sweep and its scores (``ssl``: held-out loss per culture; ``probe``: per dataset)."""

    method: str
    lam: float
    directory: Path
    ssl: Scores | None = None
    probe: Scores | None = None
    objective: float = math.nan  # mean held-out loss over the new cultures (ssl) or mean probe metric
    protected_increase: float | None = None
    admissible: bool = True


@dataclass
class MethodSweepResult:
    selected: Candidate | None
    per_method: dict[str, Candidate]
    candidates: list[Candidate]
    base: dict[str, Scores | None]
    mix: dict[str, Scores | None] | None
    out_dir: Path
    rule: str = ""
    constraint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def _ssl_objective(ssl: Scores, protected: str | None) -> float:
    return _mean([m[SSL_METRIC] for c, m in ssl.items() if c != protected])


def _probe_objective(probe: Scores, metric: str) -> float:
    values = []
    for dataset, metrics in probe.items():
        if metric not in metrics:
            raise UserError(f"metric {metric!r} missing for dataset {dataset!r} (available: {', '.join(sorted(metrics))})")
        values.append(float(metrics[metric]))
    return _mean(values)


def select_candidate(
    candidates: Sequence[Candidate],
    *,
    select_on: Literal["ssl-loss", "probe"],
    base_ssl: Scores | None,
    protected: str | None,
    max_protected_increase: float,
    probe_metric: str = "roc_auc",
) -> Candidate | None:
    """Score every candidate (sets ``objective``, ``protected_increase``, ``admissible``) and return the best
    admissible one (None when none is): argmin of the mean held-out ``pred_loss`` over the non-protected cultures
    (``ssl-loss``) or argmax of the mean probe metric (``probe``); ties to the smaller λ, then the earlier method.

    The constraint needs held-out loss of the candidate and of the base: ``ssl[protected].pred_loss -
    base_ssl[protected].pred_loss <= max_protected_increase`` (NaN is inadmissible).

    Raises:
        DataError: ``protected`` is not among the validated cultures.
    """
    order = {m: i for i, m in enumerate(dict.fromkeys(c.method for c in candidates))}
    for cand in candidates:
        if select_on == "ssl-loss":
            if cand.ssl is None:
                raise UserError(f"{cand.directory}: no held-out loss to select on")
            cand.objective = _ssl_objective(cand.ssl, protected)
        else:
            if cand.probe is None:
                raise UserError(f"{cand.directory}: no probe scores to select on")
            cand.objective = _probe_objective(cand.probe, probe_metric)
        cand.admissible = math.isfinite(cand.objective)
        if protected is not None and cand.ssl is not None and base_ssl is not None:
            if protected not in cand.ssl or protected not in base_ssl:
                raise DataError(f"protected culture {protected!r} has no held-out crops "
                                f"(validated: {', '.join(sorted(cand.ssl))})")
            cand.protected_increase = cand.ssl[protected][SSL_METRIC] - base_ssl[protected][SSL_METRIC]
            if not cand.protected_increase <= max_protected_increase:  # NaN counts as a rise
                cand.admissible = False
    admissible = [c for c in candidates if c.admissible]
    if not admissible:
        return None
    sign = 1.0 if select_on == "ssl-loss" else -1.0
    return min(admissible, key=lambda c: (sign * c.objective, c.lam, order[c.method]))


# ----------------------------------------------------------------------------------------------------------
# the multi-method sweep
# ----------------------------------------------------------------------------------------------------------
def _ssl_cultures(candidates: Sequence[Candidate]) -> list[str]:
    return sorted({c for cand in candidates if cand.ssl for c in cand.ssl})


def _probe_datasets(candidates: Sequence[Candidate]) -> list[str]:
    return sorted({d for cand in candidates if cand.probe for d in cand.probe})


def _write_table(path: Path, candidates: Sequence[Candidate], selected: Candidate | None, probe_metric: str) -> None:
    cultures, datasets = _ssl_cultures(candidates), _probe_datasets(candidates)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "lambda", "objective", "protected_increase", "admissible", "selected",
                     *(f"ssl_{SSL_METRIC}_{c}" for c in cultures), *(f"probe_{probe_metric}_{d}" for d in datasets)])
    for cand in candidates:
        writer.writerow([
            cand.method, format_lambda(cand.lam), repr(cand.objective),
            "" if cand.protected_increase is None else repr(cand.protected_increase),
            int(cand.admissible), int(cand is selected),
            *(repr(cand.ssl[c][SSL_METRIC]) if cand.ssl and c in cand.ssl else "" for c in cultures),
            *(repr(cand.probe[d].get(probe_metric, math.nan)) if cand.probe and d in cand.probe else "" for d in datasets),
        ])
    atomic_write_bytes(path, buffer.getvalue().encode())


def _write_plot(path: Path, candidates: Sequence[Candidate], selected: Candidate | None, protected: str | None,
                max_increase: float, probe_metric: str) -> None:
    from culturemert.plotting import pyplot, save_figure

    plt = pyplot()
    panels = []
    if any(c.ssl for c in candidates):
        panels.append("ssl")
        if protected is not None:
            panels.append("protected")
    if any(c.probe for c in candidates):
        panels.append("probe")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.0), squeeze=False)
    methods = list(dict.fromkeys(c.method for c in candidates))
    for ax, panel in zip(axes[0], panels):
        for method in methods:
            rows = sorted((c for c in candidates if c.method == method), key=lambda c: c.lam)
            if panel == "ssl":
                ys = [_ssl_objective(c.ssl, protected) if c.ssl else math.nan for c in rows]
            elif panel == "protected":
                ys = [c.protected_increase if c.protected_increase is not None else math.nan for c in rows]
            else:
                ys = [_probe_objective(c.probe, probe_metric) if c.probe else math.nan for c in rows]
            ax.plot([c.lam for c in rows], ys, marker="o", label=method)
        if selected is not None:
            ax.axvline(selected.lam, color="grey", linestyle=":",
                       label=f"selected {selected.method} λ={format_lambda(selected.lam)}")
        if panel == "ssl":
            ax.set_ylabel(f"held-out {SSL_METRIC} (nats), mean over new cultures")
        elif panel == "protected":
            ax.axhline(max_increase, color="red", linestyle="--", label=f"limit +{max_increase:g}")
            ax.set_ylabel(f"{protected} {SSL_METRIC} − base (nats)")
        else:
            ax.set_ylabel(f"mean validation {probe_metric}")
        ax.set_xlabel("λ")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("merge sweep on held-out validation data")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def sweep_methods(
    base_source: str | Path,
    model_sources: Sequence[str | Path],
    methods: Sequence[str],
    lambdas: Sequence[float],
    out_dir: str | Path,
    option_data: Mapping[str, Any] | None = None,
    *,
    select_on: Literal["ssl-loss", "probe"] = "ssl-loss",
    ssl: Callable[[Path], Scores] | None = None,
    probe: Callable[[Path], Scores] | None = None,
    probe_metric: str = "roc_auc",
    protected: str | None = None,
    max_protected_increase: float = 0.05,
    mix_source: str | Path | None = None,
    card_extra: Mapping[str, Any] | None = None,
    require_selection: bool = True,
) -> MethodSweepResult:
    """Merge at every (method, λ) into ``out_dir/<method>/lambda_<λ>/``, score each, select one (see
    :func:`select_candidate`), and write ``sweep.csv`` / ``sweep.png`` (both criteria where both are given),
    ``selection.json`` and ``selected/`` (the chosen merge, re-merged with a ``selection`` record in its card).
    With ``mix_source`` (the multi-culture model trained on the same data) also ``merge_vs_mix.{md,csv,png}``.

    ``ssl`` / ``probe`` map a model directory to ``{culture or dataset: {metric: value}}`` and must score
    validation data only. ``option_data`` holds MergeOptions fields shared by every method
    (:func:`options_for_method`).

    ``per_method`` holds each method's best admissible candidate; a method without one gets the candidate with
    the smallest protected rise (``admissible`` False), so the merge-vs-mix table still shows it.

    Raises:
        ConfigError: no method or λ, or no evaluator for ``select_on``. UserError: no candidate is admissible
            (after the table is written) and ``require_selection``; without it ``selected`` is then None and no
            ``selected/`` is written.
    """
    from culturemert.merge.job import load_inputs, merge_loaded

    if not methods or not lambdas:
        raise ConfigError("the sweep needs at least one method and one λ")
    if (select_on == "ssl-loss" and ssl is None) or (select_on == "probe" and probe is None):
        raise ConfigError(f"select_on {select_on!r} needs its evaluator")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_options = {m: options_for_method(option_data or {}, m) for m in dict.fromkeys(methods)}
    allow = any(o.allow_unrelated for o in per_options.values())
    inputs = load_inputs(base_source, model_sources, allow_unrelated=allow)

    def score(directory: Path, with_probe: bool = True) -> dict[str, Scores | None]:
        return {"ssl": ssl(directory) if ssl else None, "probe": probe(directory) if probe and with_probe else None}

    # the base's held-out loss is the constraint's reference; its probes only matter for the merge-vs-mix table
    base_scores = score(Path(base_source), with_probe=mix_source is not None)
    candidates: list[Candidate] = []
    for method, opts in per_options.items():
        for lam in sorted(set(float(v) for v in lambdas)):
            target = out / method / f"lambda_{format_lambda(lam)}"
            log.info("sweep: %s at λ=%s -> %s", method, format_lambda(lam), target)
            merge_loaded(inputs, target, opts.model_copy(update={"lambdas": lam}), card_extra=card_extra)
            s = score(target)
            candidates.append(Candidate(method, lam, target, s["ssl"], s["probe"]))
    kwargs = dict(select_on=select_on, base_ssl=base_scores["ssl"], protected=protected,
                  max_protected_increase=max_protected_increase, probe_metric=probe_metric)
    per_method = {}
    for method in per_options:
        own = [c for c in candidates if c.method == method]
        best = select_candidate(own, **kwargs)
        per_method[method] = best if best is not None else min(
            own, key=lambda c: (c.protected_increase if c.protected_increase is not None else math.inf, c.lam))
    selected = select_candidate(candidates, **kwargs)
    if select_on == "ssl-loss":
        rule = (f"argmin over (method, λ) of the mean held-out {SSL_METRIC} over the cultures"
                + (f" other than {protected}" if protected else "") + "; ties: smaller λ, then the method given first")
    else:
        rule = f"argmax over (method, λ) of the mean validation {probe_metric}; ties: smaller λ, then the method given first"
    constraint = (f"{protected} held-out {SSL_METRIC} at most {max_protected_increase:g} nats above the base's"
                  if protected and ssl else "none")
    _write_table(out / "sweep.csv", candidates, selected, probe_metric)
    _write_plot(out / "sweep.png", candidates, selected, protected if ssl else None, max_protected_increase, probe_metric)
    mix_scores = score(Path(mix_source)) if mix_source is not None else None
    if selected is None:
        result = MethodSweepResult(None, per_method, candidates, base_scores, mix_scores, out, rule, constraint)
        if mix_scores is not None:
            write_merge_vs_mix(out, result, mix_label=str(mix_source), protected=protected, probe_metric=probe_metric)
        if not require_selection:
            log.warning("sweep: no merge satisfies the constraint (%s)", constraint)
            return result
        smallest = min((c.protected_increase for c in candidates if c.protected_increase is not None), default=math.nan)
        raise UserError(f"no merge satisfies the constraint ({constraint}); the smallest rise was {smallest:+.4f} nats "
                        f"(see {out / 'sweep.csv'}); raise --max-protected-increase or lower λ")
    record = {
        "criterion": "held-out masked-prediction loss (no labels)" if select_on == "ssl-loss" else f"probe {probe_metric}",
        "select_on": select_on,
        "method": selected.method,
        "lambda": selected.lam,
        "objective": selected.objective,
        "protected": protected,
        "protected_increase": selected.protected_increase,
        "max_protected_increase": max_protected_increase if protected else None,
        "rule": rule,
        "constraint": constraint,
        "split": "validation",
        "methods": list(per_options),
        "lambdas": [format_lambda(v) for v in sorted(set(float(v) for v in lambdas))],
        "same_as": str(selected.directory.relative_to(out)),  # selected/ is this merge, redone with the card
    }
    merge_loaded(inputs, out / "selected", per_options[selected.method].model_copy(update={"lambdas": selected.lam}),
                 card_extra={**(dict(card_extra) if card_extra else {}), "selection": record})
    write_json_atomic(out / "selection.json", {
        **record, "selected_dir": "selected",
        "base": {"source": inputs.base_source, "fingerprint": inputs.base_fingerprint, "ssl": base_scores["ssl"]},
        "inputs": [{"source": s, "fingerprint": f} for s, f in zip(inputs.sources, inputs.fingerprints, strict=True)],
        "per_method": {m: {"lambda": c.lam, "objective": c.objective, "protected_increase": c.protected_increase,
                           "admissible": c.admissible, "ssl": c.ssl} for m, c in per_method.items()},
        "options": {m: o.model_dump(exclude={"lambdas"}) for m, o in per_options.items()},
    })
    result = MethodSweepResult(selected, per_method, candidates, base_scores, mix_scores, out, rule, constraint)
    if mix_scores is not None:
        write_merge_vs_mix(out, result, mix_label=str(mix_source), protected=protected, probe_metric=probe_metric)
    log.info("sweep: selected %s λ=%s (objective %.4f)", selected.method, format_lambda(selected.lam), selected.objective)
    return result


# ----------------------------------------------------------------------------------------------------------
# merge vs mix
# ----------------------------------------------------------------------------------------------------------
def merge_vs_mix_rows(result: MethodSweepResult, mix_label: str = "multi-culture") -> list[dict[str, Any]]:
    """Rows of the merge-vs-mix table: the base, the multi-culture model, and every method at its selected λ."""
    rows = [{"model": "base", "method": "", "lambda": None, **(result.base)}]
    if result.mix is not None:
        rows.append({"model": "multi-culture", "method": "", "lambda": None, "source": mix_label, **result.mix})
    for method, cand in result.per_method.items():
        name = f"merged-{method}" + ("" if cand.admissible else " (over the limit)")
        rows.append({"model": name, "method": method, "lambda": cand.lam, "ssl": cand.ssl,
                     "probe": cand.probe})
    return rows


def write_merge_vs_mix(out_dir: str | Path, result: MethodSweepResult, *, mix_label: str = "multi-culture",
                       protected: str | None = None, probe_metric: str = "roc_auc") -> Path:
    """``merge_vs_mix.md`` / ``.csv`` / ``.png``: per-culture held-out ``pred_loss`` (and mean probe metric per
    dataset, where probes ran) of the base, the multi-culture model and each method at its selected λ."""
    from culturemert.plotting import pyplot, save_figure

    out = Path(out_dir)
    rows = merge_vs_mix_rows(result, mix_label)
    cultures = sorted({c for r in rows if r.get("ssl") for c in r["ssl"]})
    datasets = sorted({d for r in rows if r.get("probe") for d in r["probe"]})
    header = ["model", "lambda", *(f"{c}{' (protected)' if c == protected else ''}" for c in cultures),
              *(["mean new"] if cultures else []), *(f"{d} {probe_metric}" for d in datasets)]
    table, lines = [], []
    for r in rows:
        ssl, probe = r.get("ssl") or {}, r.get("probe") or {}
        values = [ssl[c][SSL_METRIC] if c in ssl else math.nan for c in cultures]
        new = _mean([v for c, v in zip(cultures, values) if c != protected])
        probes = [probe[d].get(probe_metric, math.nan) if d in probe else math.nan for d in datasets]
        table.append([r["model"], "" if r["lambda"] is None else format_lambda(r["lambda"]), *values,
                      *([new] if cultures else []), *probes])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in table:
        writer.writerow([v if isinstance(v, str) else repr(float(v)) for v in row])
    atomic_write_bytes(out / "merge_vs_mix.csv", buffer.getvalue().encode())
    lines = [
        "# Merge vs mix", "",
        f"Held-out masked-prediction loss ({SSL_METRIC}, nats per masked frame, lower is better) per culture on the "
        "validation split; each merge method at the λ it selects by itself (" + result.rule + "; constraint: "
        + result.constraint + "); the multi-culture model was trained on the same data"
        + (f"; {probe_metric} of validation probes per dataset" if datasets else "") + "."
        + (" A method marked (over the limit) met the constraint at no λ and is shown at its smallest protected rise."
           if any("over the limit" in r["model"] for r in rows) else ""), "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]
    for row in table:
        lines.append("| " + " | ".join(v if isinstance(v, str) else f"{v:.3f}" for v in row) + " |")
    path = out / "merge_vs_mix.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(table) + 2), 4.0))
    width = 0.8 / max(len(cultures), 1)
    for j, culture in enumerate(cultures):
        ax.bar([i + j * width for i in range(len(table))], [row[2 + j] for row in table], width,
               label=culture + (" (protected)" if culture == protected else ""))
    ax.set_xticks([i + width * (len(cultures) - 1) / 2 for i in range(len(table))])
    ax.set_xticklabels([row[0] + (f"\nλ={row[1]}" if row[1] else "") for row in table], fontsize="small")
    ax.set_ylabel(f"held-out {SSL_METRIC} (nats)")
    ax.set_title("merge vs mix: held-out masked-prediction loss")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, out / "merge_vs_mix.png", dpi=120)
    return path
