"""The offline quickstart: the whole CultureMERT workflow on the embedded corpus, on a laptop CPU.

Every step calls the same public API (and the same recipe format) that real use does:

1. ``corpus``   -- render the music21 corpus (+ SymbTr makam when given) to 24 kHz audio with tags and splits;
2. ``prepare``  -- one prepared directory per culture; k-means teacher (the base's, when a base is shipped);
3. ``base``     -- the shipped base (pre-trained from scratch on the Western part with the shipped recipe
                   ``quickstart/base``) or, with ``retrain_base``, that recipe run now;
4. ``cpt``      -- two-stage continual pre-training on the new traditions with 20 % Western replay in stage 1;
5. ``control``  -- the same stages, steps and learning rates on Western music only (equal compute);
6. ``single``   -- one single-culture CPT per new tradition (steps split so that together they cost one CPT);
7. ``merge``    -- task arithmetic of the single-culture models on the base, λ chosen on validation only;
8. ``evaluate`` -- held-out masked-prediction loss per culture (the trainer's validation code,
                   :mod:`culturemert.train.validation`, on more crops), then MARBLE-protocol probing of base,
                   control, CPT, merged model and a log-mel-statistics baseline on the corpus' tagging tasks;
9. ``report``   -- the paper-style table with seed spreads, the runs' training/validation curves, and
                   ``quickstart.md``.

Every input is checked before any work starts (:func:`check_inputs`): the shipped recipes, base and teacher,
the corpus extra, ``--symbtr``.

What the quickstart can and cannot show is documented in README.md ("What the quickstart shows").
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from culturemert.config import StrictModel
from culturemert.errors import ConfigError, DataError
from culturemert.files import atomic_write_text, write_json_atomic
from culturemert.merge.options import MergeMethod

log = logging.getLogger(__name__)

__all__ = ["QuickstartConfig", "run_quickstart", "heldout_masked_loss", "build_tasks", "check_inputs", "SHIPPED_BASE",
           "QUICKSTART_RECIPES"]

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_BASE = PACKAGE_DIR / "assets" / "quickstart"
#: The shipped recipes the quickstart trains with (``culturemert.train.shipped_recipes`` names).
QUICKSTART_RECIPES = ("quickstart/base", "quickstart/cpt", "quickstart/control", "quickstart/single-culture")

# Tag families probed per culture (the corpus also has subregion tags, too sparse at this size).
_TASK_PREFIXES = {
    "chinese": ("region", "mode"),
    "german": ("region", "meter", "mode"),
    "irish": ("tune_type", "meter", "mode"),
    "scottish": ("meter", "mode"),
    "turkish": ("makam", "usul", "form"),
}


class QuickstartConfig(StrictModel):
    """Every knob of the quickstart (defaults: what ``make quickstart`` runs)."""

    seed: int = 0
    base_culture: str = "german"
    cultures: list[str] = Field(default_factory=lambda: ["chinese", "german", "irish"])
    pieces_per_culture: dict[str, int] = Field(
        default_factory=lambda: {"chinese": 300, "german": 600, "irish": 300, "turkish": 300}
    )
    duration_s: float = Field(20.0, gt=0)
    symbtr: Path | None = None  # adds Turkish makam as a new tradition (SymbTr txt folder or archive)
    kmeans_clusters: int = Field(128, ge=2)
    kmeans_fit_seconds: float = Field(1800.0, gt=0)
    retrain_base: bool = False
    base_steps: int | None = Field(None, ge=1)  # override base.yaml's steps when retraining
    cpt_steps_scale: float = Field(1.0, gt=0)  # scales every CPT/control/single stage's steps (smoke runs)
    # One λ: merge directly. Several: merge at each, probe on validation splits only, keep the best (costs one
    # extra evaluation per λ). 1.0 adds both single-culture task vectors fully; each was trained with half the
    # multi-culture run's steps, so λ = 1 is the compute-matched analogue of the paper's λ = 0.2 over 4 models.
    merge_lambdas: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    # Merge vs mix: every method at the λ of this grid that it selects without labels (held-out masked-prediction
    # loss of the new cultures, base culture's loss at most max_protected_increase nats above the base's), next to
    # the CPT model trained on the same data. [] skips it.
    merge_methods: list[MergeMethod] = Field(default_factory=lambda: ["task_arithmetic", "ties", "tsv", "iso_c"])
    merge_method_lambdas: list[float] = Field(default_factory=lambda: [0.5, 1.0], min_length=1)
    max_protected_increase: float = Field(0.05, ge=0.0)
    # Probe: MARBLE's protocol (MLP, dropout 0.2, BCE, Adam, batch 64, ReduceLROnPlateau, early stopping and
    # selection on validation) with a smaller grid and hidden layer so five models fit the CPU budget [ours].
    probe_seeds: int = Field(3, ge=1)
    probe_max_epochs: int = Field(60, ge=1)
    probe_patience: int = Field(8, ge=1)
    probe_hidden: int = Field(128, ge=1)
    probe_lrs: list[float] = Field(default_factory=lambda: [5e-4, 5e-3], min_length=1)
    task_top_n: int = Field(12, ge=2)
    heldout_crops: int = Field(96, ge=1)  # per culture, for the held-out table of every model
    validation_crops: int | None = Field(None, ge=1)  # per culture during training; None: the recipes' value
    embed_window_s: float = Field(5.0, gt=0)
    # Probe on the first 5 s of each piece (one window): it keeps the evaluation of five
    # models inside the CPU budget; the rendered pieces loop their tune, so 5 s already hold several bars.
    embed_max_seconds: float | None = Field(5.0, gt=0)
    workers: int = Field(2, ge=1)


# ----------------------------------------------------------------------------------------------------------
# corpus -> manifests and tasks
# ----------------------------------------------------------------------------------------------------------
def _read_corpus(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_manifests(corpus_csv: Path, out_dir: Path) -> dict[str, Path]:
    """One prepare manifest per culture (all splits; the loader and k-means fitting read only 'train')."""
    rows = _read_corpus(corpus_csv)
    by_culture: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_culture[r["culture"]].append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for culture, items in sorted(by_culture.items()):
        path = out_dir / f"manifest-{culture}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "culture", "split"])
            for r in items:
                w.writerow([str((corpus_csv.parent / r["path"]).resolve()), culture, r["split"]])
        paths[culture] = path
    return paths


def build_tasks(corpus_csv: Path, out_dir: Path, top_n: int = 12) -> list[dict[str, Any]]:
    """Tagging tasks as generic CSVs: ``culture`` over all pieces, and one per culture over its own tag families.

    Within a culture task the vocabulary is the ``top_n`` most frequent tags of the chosen families on the train
    split (the same rule as the paper's datasets); tags with no positive test example are reported by the probe.
    """
    rows = _read_corpus(corpus_csv)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks: list[dict[str, Any]] = []

    def write(name: str, items: list[tuple[str, str, list[str]]], vocabulary: list[str]) -> None:
        path = out_dir / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "split", "tags"])
            for audio, split, tags in items:
                w.writerow([audio, split, "|".join(t for t in tags if t in vocabulary)])
        tasks.append({"kind": "csv", "name": name, "paths": {"path": str(path)}, "options": {"vocabulary": vocabulary}})

    def abs_path(r: dict[str, str]) -> str:
        return str((corpus_csv.parent / r["path"]).resolve())

    cultures = sorted({r["culture"] for r in rows})
    write("culture", [(abs_path(r), r["split"], [f"culture--{r['culture']}"]) for r in rows],
          [f"culture--{c}" for c in cultures])
    for culture in cultures:
        prefixes = _TASK_PREFIXES.get(culture, ("mode", "meter"))
        items = []
        for r in rows:
            if r["culture"] != culture:
                continue
            tags = [t for t in r["tags"].split("|") if t.split("--", 1)[0] in prefixes]
            items.append((abs_path(r), r["split"], tags))
        counts = Counter(t for _, split, tags in items if split == "train" for t in tags)
        # at least 3 training and 1 test positive, so every tag can be learned and scored
        test_counts = Counter(t for _, split, tags in items if split == "test" for t in tags)
        eligible = [t for t in counts if counts[t] >= 3 and test_counts[t] >= 1]
        vocabulary = sorted(eligible, key=lambda t: (-counts[t], t))[:top_n]
        if len(vocabulary) >= 2:
            write(culture, items, vocabulary)
    return tasks


# ----------------------------------------------------------------------------------------------------------
# held-out masked-prediction loss
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_masked_loss(
    model_source: str | Path,
    prepared: dict[str, Path],
    *,
    split: str = "valid",
    crops_per_culture: int = 48,
    batch_clips: int = 8,
    crop_seconds: float = 5.0,
    seed: int = 0,
    objective: Any = None,
) -> dict[str, dict[str, float]]:
    """Held-out validation metrics per culture of one model: the trainer's validation code
    (:func:`culturemert.train.validation.evaluate_validation_set`) on ``crops_per_culture`` crops of the ``split``
    items of ``prepared`` (culture -> prepared directory), with the crops and masks of a run whose recipe seed is
    ``seed``. Every model scored with the same arguments sees the same crops and masks.

    Returns per culture ``loss``, ``pred_loss``, ``acc``, ``ce_k``/``acc_k``, ``cqt_mse`` (see
    :mod:`culturemert.train.validation`) plus ``masked_ce`` (= ``pred_loss``) and ``masked_acc`` (= ``acc``).
    ``objective`` is the run's :class:`~culturemert.objective.ObjectiveConfig` (default: MERT's).

    Raises:
        DataError: the model has no pre-training heads, or a culture has no held-out crops.
    """
    from culturemert.merge.select import HeldOutLoss

    held_out = HeldOutLoss(list(prepared.values()), cultures=list(prepared), split=split,
                           crops_per_culture=crops_per_culture, batch_clips=batch_clips, crop_seconds=crop_seconds,
                           seed=seed, objective=objective)
    results = held_out(model_source)
    for metrics in results.values():
        metrics["masked_ce"], metrics["masked_acc"] = metrics["pred_loss"], metrics["acc"]
    return {c: results[c] for c in prepared}


# ----------------------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------------------
def check_inputs(config: QuickstartConfig) -> None:
    """Everything the quickstart needs, checked before it renders a single piece.

    Raises:
        ConfigError: a shipped recipe, the shipped base or teacher is missing (a broken install), or
            ``symbtr`` does not exist.
        DataError: the corpus extra (music21, pretty_midi, mido) is not installed.
    """
    import importlib.util

    from culturemert.train import resolve_recipe

    for name in QUICKSTART_RECIPES:
        if name == "quickstart/base" and not config.retrain_base:
            continue
        resolve_recipe(name)  # ConfigError naming the shipped recipes when one is missing
    if not config.retrain_base:
        for path in (SHIPPED_BASE / "base" / "culturemert.json", SHIPPED_BASE / "teacher" / "kmeans.safetensors"):
            if not path.is_file():
                raise ConfigError(f"the shipped quickstart base is incomplete: {path} is missing (reinstall "
                                  "culturemert, or pass --retrain-base)")
    if config.symbtr is not None and not Path(config.symbtr).exists():
        raise ConfigError(f"--symbtr: {config.symbtr} does not exist")
    missing = [m for m in ("music21", "pretty_midi", "mido") if importlib.util.find_spec(m) is None]
    if missing:
        raise DataError(f"the quickstart corpus needs {', '.join(missing)}: pip install 'culturemert[corpus]'")


def _train(recipe_name: str, out: Path, overrides: list[str], steps_scale: float = 1.0, progress: bool = True) -> Path:
    from culturemert.train import Trainer, load_recipe

    recipe = load_recipe(f"quickstart/{recipe_name}", overrides + ([] if progress else ["runtime.progress=false"]))
    if steps_scale != 1.0:
        for stage in recipe.stages:
            stage.steps = max(1, int(round(stage.steps * steps_scale)))
            if stage.lr.warmup_steps >= stage.steps:
                stage.lr.warmup_steps = max(0, stage.steps // 10)
    shipped_steps = sum(s.steps for s in load_recipe(f"quickstart/{recipe_name}").stages)
    run_steps = sum(s.steps for s in recipe.stages)
    if recipe.validate is not None and run_steps < shipped_steps:
        # smoke runs shorten the stages, not the validation set, and the stage-start/-end points are a fixed cost
        recipe.validate.max_overhead = recipe.validate.max_overhead * shipped_steps / run_steps
    final = Trainer(recipe, out, resume="auto").run()
    if final is None:
        raise DataError(f"training {recipe_name} into {out} produced no export")
    return Path(final)


def _copy_export(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _fmt(mean: float, std: float | None) -> str:
    if std is None or not math.isfinite(std):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def run_quickstart(config: QuickstartConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Run everything into ``out_dir`` (resumable: finished steps are skipped on a re-run); returns the report."""
    from culturemert.corpus import CorpusConfig, CorpusSettingsChanged, build_corpus
    from culturemert.data import prepare
    from culturemert.evaluate.pipeline import EvalConfig, evaluate, evaluate_on_validation
    from culturemert.evaluate.embed import EmbedSettings
    from culturemert.evaluate.probe import ProbeSettings
    from culturemert.merge import MergeOptions, merge_models, sweep_merge
    from culturemert.teachers import KMeansTeacher, build_teacher

    check_inputs(config)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    def lap(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        log.info("quickstart: %s done in %.1f s", name, timings[name])

    # 1. corpus ---------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    cultures = list(config.cultures) + (["turkish"] if config.symbtr and "turkish" not in config.cultures else [])
    if config.base_culture not in cultures:
        raise ConfigError(f"base_culture {config.base_culture!r} is not among the cultures {cultures}")
    corpus_cfg = CorpusConfig(
        cultures=cultures,
        pieces_per_culture={c: config.pieces_per_culture.get(c, 300) for c in cultures},
        duration_s=config.duration_s,
        seed=config.seed,
        symbtr=config.symbtr,
        workers=config.workers,
    )
    try:
        summary = build_corpus(corpus_cfg, out / "corpus", progress=progress)
    except CorpusSettingsChanged as exc:
        # an output folder from another version or seed: every later stage was built from that corpus too
        raise DataError(f"{exc}. For the quickstart: pass another --out, or delete {out} to start over") from None
    corpus_csv = Path(summary.csv_path)
    new_cultures = [c for c in cultures if c != config.base_culture]
    lap("corpus", t0)

    # 2. prepare --------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    manifests = write_manifests(corpus_csv, out / "manifests")
    shipped = (SHIPPED_BASE / "base" / "culturemert.json").is_file() and not config.retrain_base
    teacher_file = SHIPPED_BASE / "teacher" / "kmeans.safetensors"
    prepared: dict[str, Path] = {}
    base_dir = out / "prepared" / config.base_culture
    if shipped and teacher_file.is_file():
        teacher = KMeansTeacher.load(teacher_file)
    else:
        teacher = build_teacher("kmeans", codebook_size=config.kmeans_clusters, seed=config.seed)
    prepare(manifests[config.base_culture], base_dir, teacher, workers=config.workers, seed=config.seed,
            kmeans_fit_seconds=config.kmeans_fit_seconds, progress=progress)
    prepared[config.base_culture] = base_dir
    # Re-load the teacher from its file for the other cultures, so a re-run hands `prepare` exactly the same
    # teacher state as the first run did (and resumes instead of refusing a changed configuration).
    fitted = KMeansTeacher.load(teacher_file if shipped and teacher_file.is_file()
                                else base_dir / "teacher" / "kmeans.safetensors")
    for culture in new_cultures:
        prepare(manifests[culture], out / "prepared" / culture, fitted, workers=config.workers, seed=config.seed,
                progress=progress)
        prepared[culture] = out / "prepared" / culture
    lap("prepare", t0)

    # 3. base -----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    models = out / "models"
    models.mkdir(exist_ok=True)
    base_model = models / "base"
    if not (base_model / "culturemert.json").is_file():
        if shipped:
            _copy_export(SHIPPED_BASE / "base", base_model)
        else:
            overrides = [f"data.dirs=[{base_dir}]", f"seed={config.seed}"]
            if config.base_steps:
                overrides.append(f"stages.0.steps={config.base_steps}")
            _copy_export(_train("base", out / "runs" / "base", overrides, progress=progress), base_model)
    lap("base", t0)

    # 4-6. CPT, control, single-culture ----------------------------------------------------------------
    t0 = time.perf_counter()
    replay = config.base_culture
    sources = "{" + ", ".join(f"{c}: 1" for c in new_cultures) + "}"
    common = [f"base.source={base_model}", f"seed={config.seed}"]
    if config.validation_crops is not None:
        common.append(f"validate.crops_per_culture={config.validation_crops}")
    all_dirs = "[" + ", ".join(str(prepared[c]) for c in [*new_cultures, replay]) + "]"
    runs: dict[str, Path] = {}
    if not (models / "cpt" / "culturemert.json").is_file():
        final = _train("cpt", out / "runs" / "cpt", common + [
            f"data.dirs={all_dirs}",
            f"stages.0.mixture={{sources: {sources}, replay: {{{replay}: 0.2}}}}",
            f"stages.1.mixture={{sources: {sources}}}",
        ], config.cpt_steps_scale, progress)
        _copy_export(final, models / "cpt")
    runs["cpt"] = models / "cpt"
    if not (models / "control" / "culturemert.json").is_file():
        # the new traditions' directories are there for validation only: the mixtures draw Western crops alone
        final = _train("control", out / "runs" / "control", common + [
            f"data.dirs={all_dirs}",
            f"stages.0.mixture={{sources: {{{replay}: 1}}}}",
            f"stages.1.mixture={{sources: {{{replay}: 1}}}}",
        ], config.cpt_steps_scale, progress)
        _copy_export(final, models / "control")
    runs["control"] = models / "control"
    lap("cpt+control", t0)
    t0 = time.perf_counter()
    singles: list[Path] = []
    # single-culture.yaml is written for two traditions; rescale so the singles together cost one CPT
    single_scale = config.cpt_steps_scale * 2.0 / max(len(new_cultures), 1)
    for culture in new_cultures:
        target = models / f"single-{culture}"
        if not (target / "culturemert.json").is_file():
            final = _train("single-culture", out / "runs" / f"single-{culture}", common + [
                f"data.dirs=[{prepared[culture]}, {prepared[replay]}]",
                f"stages.0.mixture={{sources: {{{culture}: 1}}, replay: {{{replay}: 0.2}}}}",
                f"stages.1.mixture={{sources: {{{culture}: 1}}}}",
            ], single_scale, progress)
            _copy_export(final, target)
        singles.append(target)
    lap("single-culture", t0)

    # 7-8. tasks, merge (λ on validation), evaluation ---------------------------------------------------
    t0 = time.perf_counter()
    tasks = build_tasks(corpus_csv, out / "tasks", top_n=config.task_top_n)
    eval_cfg = EvalConfig(
        datasets=tasks,
        embed=EmbedSettings(window=config.embed_window_s, max_seconds=config.embed_max_seconds),
        probe=ProbeSettings(seeds=config.probe_seeds, max_epochs=config.probe_max_epochs,
                            patience=config.probe_patience, hidden=config.probe_hidden, lrs=list(config.probe_lrs)),
        cache_dir=out / "eval" / "cache",
    )
    merged = models / "merged-ta"
    if not (merged / "culturemert.json").is_file():
        if len(config.merge_lambdas) == 1:
            merge_models(base_model, singles, merged,
                         MergeOptions(method="task_arithmetic", lambdas=float(config.merge_lambdas[0])))
        else:
            sweep = sweep_merge(base_model, singles, config.merge_lambdas, out / "merge-sweep", eval_cfg,
                                MergeOptions(method="task_arithmetic"), evaluator=evaluate_on_validation,
                                metric="roc_auc")
            _copy_export(Path(sweep.out_dir) / "selected", merged)
    lap("merge", t0)

    t0 = time.perf_counter()
    heldout = {}
    for name, path in [("base", base_model), ("control", runs["control"]), ("cpt", runs["cpt"]), ("merged-ta", merged)]:
        heldout[name] = heldout_masked_loss(path, prepared, crops_per_culture=config.heldout_crops, seed=config.seed)
    lap("heldout-loss", t0)

    t0 = time.perf_counter()
    merge_methods = _merge_vs_mix(config, out, base_model, singles, runs["cpt"], prepared,
                                  known={base_model: heldout["base"], runs["cpt"]: heldout["cpt"]})
    for method, row in merge_methods.items():
        heldout[f"merged-{method}"] = row["ssl"]
    write_json_atomic(out / "heldout_loss.json", heldout)
    lap("merge-vs-mix", t0)

    t0 = time.perf_counter()
    model_list = ["baseline:logmel", str(base_model), str(runs["control"]), str(runs["cpt"]), str(merged)]
    evaluate(model_list, eval_cfg, out / "eval", base=str(base_model), progress=progress)
    lap("evaluate", t0)

    timings["total"] = time.perf_counter() - started
    report = write_quickstart_report(out, heldout, timings, config, summary.synthesizer, new_cultures, merge_methods)
    print(report.read_text(encoding="utf-8"))
    return report


def _merge_vs_mix(config: QuickstartConfig, out: Path, base_model: Path, singles: list[Path], mix: Path,
                  prepared: dict[str, Path], known: dict[Path, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Sweep ``config.merge_methods`` x ``config.merge_method_lambdas`` on the single-culture models, select each
    method's λ by held-out loss (no labels), and write ``merge-methods/merge_vs_mix.{md,csv,png}`` next to the CPT
    model. Returns per method ``{"lambda", "admissible", "ssl": held-out metrics as heldout_masked_loss}`` (read
    back from ``merge_methods.json`` on a re-run). ``known``: held-out metrics already computed on the same crops
    (the held-out table's base and CPT rows), reused instead of evaluated again."""
    from culturemert.merge.select import HeldOutLoss, sweep_methods

    if not config.merge_methods:
        return {}
    sweep_dir = out / "merge-methods"
    summary_path = sweep_dir / "merge_methods.json"
    if not summary_path.is_file():
        # the same crops and masks as the held-out table (heldout_masked_loss's arguments)
        held_out = HeldOutLoss(list(prepared.values()), cultures=list(prepared), crops_per_culture=config.heldout_crops,
                               seed=config.seed)
        cached = {Path(k).resolve(): v for k, v in (known or {}).items()}

        def ssl(model_dir: Path) -> dict[str, dict[str, float]]:
            hit = cached.get(Path(model_dir).resolve())
            return hit if hit is not None else held_out(model_dir)

        result = sweep_methods(base_model, singles, config.merge_methods, config.merge_method_lambdas, sweep_dir,
                               select_on="ssl-loss", ssl=ssl, protected=config.base_culture,
                               max_protected_increase=config.max_protected_increase, mix_source=mix,
                               require_selection=False)
        rows = {}
        for method, cand in result.per_method.items():
            ssl = {c: dict(cand.ssl[c]) for c in prepared} if cand.ssl else {}
            for metrics in ssl.values():
                metrics["masked_ce"], metrics["masked_acc"] = metrics["pred_loss"], metrics["acc"]
            rows[method] = {"lambda": cand.lam, "admissible": cand.admissible, "ssl": ssl,
                            "protected_increase": cand.protected_increase}
        write_json_atomic(summary_path, {
            "methods": rows, "constraint": result.constraint, "rule": result.rule,
            "selected": None if result.selected is None else {"method": result.selected.method,
                                                              "lambda": result.selected.lam},
        })
    return json.loads(summary_path.read_text(encoding="utf-8"))["methods"]


def _run_summary(run_dir: Path) -> dict[str, Any]:
    """What a training run's logs say about validation: alarms, best and last points (empty without validation)."""
    from culturemert.files import read_jsonl

    summary_path = run_dir / "validation.json"
    if not summary_path.is_file():
        return {}
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    alarms = [r["message"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "forgetting"]
    return {"best": summary.get("best"), "last": summary.get("last"), "new": summary.get("new", []),
            "protected": summary.get("protected", []), "metric": summary.get("metric"), "alarms": alarms}


def write_quickstart_report(out: Path, heldout: dict, timings: dict, config: QuickstartConfig, synthesizer: str,
                            new_cultures: list[str], merge_methods: dict | None = None) -> Path:
    first = heldout[next(iter(heldout))]
    lines = [
        "# culturemert quickstart",
        "",
        f"Corpus: {', '.join(sorted({*new_cultures, config.base_culture}))} ({synthesizer}); base culture "
        f"(Western, pre-training + replay): **{config.base_culture}**; new traditions: **{', '.join(new_cultures)}**.",
        "",
        "## Held-out masked-prediction loss per culture",
        "",
        f"Masked-prediction cross-entropy (nats per masked frame; masked-frame accuracy) on {config.heldout_crops} "
        "valid-split crops per culture, the same crops and masks for every model (the trainer's validation code; "
        "lower is better):",
        "",
        "| model | " + " | ".join(first.keys()) + " |",
        "|---|" + "---|" * len(first),
    ]
    for name, per in heldout.items():
        method = name.removeprefix("merged-")
        if merge_methods and name.startswith("merged-") and method in merge_methods:
            row = merge_methods[method]
            name = f"{name} (λ = {row['lambda']:g}{'' if row['admissible'] else ', over the limit'})"
        lines.append(f"| {name} | " + " | ".join(f"{v['masked_ce']:.3f} ({100 * v['masked_acc']:.1f} %)" for v in per.values()) + " |")
    if merge_methods:
        lines += ["", f"merged-METHOD rows: the single-culture models merged with each method at the λ in "
                  f"{{{', '.join(f'{v:g}' for v in config.merge_method_lambdas)}}} it selects by held-out loss (mean "
                  f"over the new cultures; {config.base_culture} at most {config.max_protected_increase:g} nats above "
                  "the base; no labels); selected on these validation crops, so their numbers are optimistic. "
                  "Merge vs mix: `merge-methods/merge_vs_mix.md`, `merge-methods/merge_vs_mix.png`."]
    curves = [(name, out / "runs" / name) for name in ("cpt", "control", "base")
              if (out / "runs" / name / "loss_curve.png").is_file()]
    if curves:
        lines += ["", "## Training curves", "",
                  "Per run: training loss per culture (EMA, raw faint), held-out validation loss per culture during "
                  f"training ({config.base_culture} protected by the forgetting alarm), learning rate with stage "
                  "boundaries.", ""]
        for name, run_dir in curves:
            lines += [f"![{name} run](runs/{name}/loss_curve.png)", ""]
            info = _run_summary(run_dir)
            if info.get("best") and info.get("last"):
                lines.append(f"- {name}: mean validation {info['metric']} over {', '.join(info['new'])}: "
                             f"{info['last']['value']:.3f} at the end (exports/final), best {info['best']['value']:.3f} "
                             f"at global step {info['best']['global_step']} (exports/best)")
            if info:
                lines.append(f"- {name}: forgetting alarms ({', '.join(info['protected'])}): "
                             + ("; ".join(info["alarms"]) if info["alarms"] else "none"))
            lines.append("")
    report_md = out / "eval" / "report" / "report.md"
    lines += ["", "## Probing (test split; ROC-AUC / AP in %, mean ± std over probe seeds)", ""]
    if report_md.is_file():
        lines.append(report_md.read_text(encoding="utf-8"))
    lines += ["", "## Wall time", "", *(f"- {k}: {v:.0f} s" for k, v in timings.items()), ""]
    path = out / "quickstart.md"
    atomic_write_text(path, "\n".join(lines))
    write_json_atomic(out / "quickstart.json", {"heldout": heldout, "timings": timings,
                                                "runs": {n: _run_summary(d) for n, d in curves},
                                                "config": json.loads(config.model_dump_json())})
    return path
