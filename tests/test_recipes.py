"""Shipped recipes: provenance tags agree with the documented list of what the paper states, and MERT's
size-dependent values (95M vs 330M) are used or warned about."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from transformers import HubertConfig

from culturemert.train.recipe import RECIPES_DIR
from culturemert.train import load_recipe
from culturemert.train.mert_sizes import model_size, warn_size_mismatches

REPO = Path(__file__).resolve().parents[1]
RECIPES = RECIPES_DIR  # the shipped recipes (package data)
DOC = REPO / "docs" / "pretraining.md"

TAG = re.compile(r"\[paper:\s*([^\]]+?)\s*\]")


def _paper_table() -> dict[str, dict[str, object]]:
    """Rows of the "What the paper states" table: id -> {check, recipes}."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("### What the paper states", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, dict[str, object]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("id", "---") or not line.startswith("|"):
            continue
        rid, _, check, recipes = cells
        rows[rid] = {
            "check": check.strip("`"),
            "recipes": {r.strip() for r in recipes.split(",") if r.strip()},
        }
    return rows


def _recipe_files() -> dict[str, Path]:
    return {p.relative_to(RECIPES).with_suffix("").as_posix(): p for p in sorted(RECIPES.rglob("*.yaml"))}


def _lookup(data: object, path: str) -> list[object]:
    """Values at a dotted path; ``*`` runs over a list."""
    nodes = [data]
    for part in path.split("."):
        nxt = []
        for node in nodes:
            if part == "*":
                nxt.extend(node)  # type: ignore[arg-type]
            elif isinstance(node, list):
                nxt.append(node[int(part)])
            else:
                nxt.append(node[part])  # type: ignore[index]
        nodes = nxt
    return nodes


def _holds(check: str, data: dict) -> bool:
    m = re.fullmatch(r"(len|sum)\((.+)\)\s*=\s*(.+)", check)
    if m:
        fn, path, want = m.groups()
        (value,) = _lookup(data, path)
        got = len(value) if fn == "len" else sum(value.values() if isinstance(value, dict) else value)  # type: ignore[arg-type]
        return got == pytest.approx(yaml.safe_load(want))
    path, op, want = re.fullmatch(r"(\S+)\s*([=~])\s*(.+)", check).groups()  # type: ignore[union-attr]
    values = _lookup(data, path)
    if op == "~":
        return all(want in str(v) for v in values)
    return all(v == yaml.safe_load(want) for v in values)


def test_paper_tags_in_every_recipe_are_exactly_the_documented_list():
    table = _paper_table()
    assert {"base-mert-v1-95m", "encodec-teacher", "two-stage", "data-650h", "replay-stage1", "ta-lambda"} <= set(table)
    recipes = _recipe_files()
    for rid, row in table.items():
        unknown = row["recipes"] - set(recipes)  # type: ignore[operator]
        assert not unknown, f"docs table row {rid!r} names unknown recipes {unknown}"
    for name, path in recipes.items():
        text = path.read_text(encoding="utf-8")
        used = {t for t in TAG.findall(text) if t != "<id>"}
        # every "[paper" must be a well-formed tag: no bare [paper] or [paper, inferred]
        assert text.count("[paper") == len(TAG.findall(text)), f"{name}: a [paper] tag without an id"
        documented = {rid for rid, row in table.items() if name in row["recipes"]}  # type: ignore[operator]
        assert used == documented, f"{name}: tags {sorted(used)} but docs/pretraining.md lists {sorted(documented)}"
        data = load_recipe(path).model_dump(mode="json")
        for rid in used:
            check = str(table[rid]["check"])
            if check in ("—", ""):
                continue
            for one in check.split(";"):
                assert _holds(one.strip(), data), f"{name}: [paper: {rid}] but `{one.strip()}` does not hold"


def test_stage_one_trainable_set_and_length_are_not_tagged_as_paper():
    # the paper states neither which parameters stage 1 trains nor that it lasts ~100 h
    for path in RECIPES.rglob("*.yaml"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if "[paper" in line:
                lowered = line.lower()
                assert "frozen" not in lowered and "100 h" not in lowered, f"{path.name}: {line.strip()}"


def test_no_recipe_doc_or_source_cites_files_outside_the_repository():
    pattern = re.compile(r"shared/research|paper\.md|mert-marble\.md|anchors\.md")
    files = [*RECIPES.rglob("*.yaml"), DOC, REPO / "docs" / "data.md", REPO / "src" / "culturemert" / "objective.py",
             *(REPO / "src" / "culturemert" / "teachers").glob("*.py"), REPO / "src" / "culturemert" / "data" / "prepare.py"]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not pattern.search(text), f"{path.relative_to(REPO)} cites a file outside the repository"
        assert "§" not in text, f"{path.relative_to(REPO)} cites a section of an outside note"


# ------------------------------------------------------------------------------------- model size (95M vs 330M)
def test_330m_recipe_has_mert_330m_published_values_and_loads_without_warning(caplog):
    # MERT_RVQ-VAE_CQT_330M.yaml: feature_grad_mult 1.0, inbatch_noise_augment_len_range [12000, 36000],
    # max_sample_size 122880 (5.12 s), clip_norm 1.0, max_tokens 900000 -> 900000 // 122880 = 7 clips per GPU
    with caplog.at_level(logging.WARNING):
        recipe = load_recipe(RECIPES / "culturemert-330m.yaml")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert recipe.objective.feature_grad_mult == 1.0
    assert tuple(recipe.objective.mixture_length_range) == (12000, 36000)
    assert recipe.objective.mask_group_clips == 900_000 // 122_880
    for stage in recipe.stages:
        assert stage.crop_samples == 122_880 and stage.clip_grad_norm == 1.0
    assert "MERT-v1-330M" in recipe.base.source


@pytest.mark.parametrize(
    "override",
    ["base.source=m-a-p/MERT-v1-330M::MERT-v1-330M_fairseq.pt", "base={preset: mert-v1-330m}"],
)
def test_330m_base_with_95m_objective_values_warns_naming_the_keys(caplog, override):
    with caplog.at_level(logging.WARNING):
        load_recipe(RECIPES / "culturemert-95m.yaml", [override])
    text = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for key in (
        "objective.feature_grad_mult=0.1",
        "objective.mixture_length_range=[12000, 24000]",
        "objective.mask_group_clips=16",
        "stages.0.crop_seconds=5",
        "stages.1.clip_grad_norm=10",
    ):
        assert key in text, (key, text)
    assert "MERT-v1-330M" in text


def test_95m_recipes_and_small_presets_do_not_warn_but_a_95m_base_with_330m_values_does(caplog):
    with caplog.at_level(logging.WARNING):
        load_recipe(RECIPES / "culturemert-95m.yaml")
        load_recipe(RECIPES / "single-culture-95m.yaml")
        load_recipe(RECIPES / "tiny-test.yaml", ["objective.feature_grad_mult=1.0"])  # tiny: no MERT size
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with caplog.at_level(logging.WARNING):
        load_recipe(RECIPES / "culturemert-330m.yaml", ["base.source=some/checkpoint-95m-lookalike::MERT-v1-95M.pt"])
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "objective.feature_grad_mult=1 (MERT: 0.1)" in text and "stages.1.crop_seconds=5.12 (MERT: 5)" in text


def test_a_base_whose_name_hides_its_size_is_checked_by_its_shape(caplog):
    recipe = load_recipe(RECIPES / "culturemert-95m.yaml", ["base.source=/ckpt/my_model.pt"])
    big = SimpleNamespace(config=HubertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16))
    assert model_size(big) == "mert-v1-330m"
    assert model_size(SimpleNamespace(config=HubertConfig(hidden_size=768, num_hidden_layers=12))) == "mert-v1-95m"
    assert model_size(SimpleNamespace(config=HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2))) is None
    with caplog.at_level(logging.WARNING):
        found = warn_size_mismatches(recipe, model_size(big), "base /ckpt/my_model.pt")
    assert any(f.startswith("objective.feature_grad_mult=0.1") for f in found)
    assert "objective.feature_grad_mult" in caplog.text
