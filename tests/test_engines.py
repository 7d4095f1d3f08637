"""Engine profiles (meshplan/engines.py): the search offers only what the chosen engine runs, a pin it cannot
run is one line naming the engine, plans record their engine, and docs/engines.md shows the profiles as the
code holds them."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meshplan.engines import ENGINES, MEGATRON, MESHPLAN, TORCHTITAN, Engine, get_engine
from meshplan.errors import InputError
from meshplan.plan import Plan
from meshplan.planner.search import search
from meshplan.spec import TrainSpec, load_cluster, load_model

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gen_engine_docs", REPO / "scripts" / "gen_engine_docs.py")
gen_engine_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_engine_docs)

LLAMA_8B, TRAIN = load_model("llama3-8b"), TrainSpec(64, 4096, "bf16")


def top_plans(engine: str, fixes: dict | None = None, cluster: str = "dgx-h100:2", top: int = 8) -> list[Plan]:
    return search(LLAMA_8B, load_cluster(cluster), TRAIN, fixes or {}, top=top, refine=False, engine=engine).plans


def test_unknown_engine_is_one_line_naming_the_choices():
    with pytest.raises(InputError) as error:
        get_engine("deepspeed")
    assert "--engine" in str(error.value) and "meshplan, megatron, torchtitan" in str(error.value)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_search_offers_only_what_the_engine_runs(engine):
    profile = ENGINES[engine]
    plans = top_plans(engine, {"pp": 2}) + top_plans(engine, {"cp": 2, "pp": 1})
    for plan in plans:
        assert plan.engine == engine
        for field, value in plan.engine_fields().items():
            assert profile.refusal(field, value) is None, (engine, field, value)
        assert LLAMA_8B.kv_heads % plan.tp == 0


def test_each_engine_keeps_its_own_defaults_on_gpus():
    meshplan, megatron, titan = (top_plans(e, {"tp": 2, "pp": 1}, top=1)[0] for e in ENGINES)
    assert meshplan.tp_overlap and meshplan.compile                           # async TP on compiled blocks
    assert megatron.tp_overlap and not megatron.compile                       # TE userbuffers, no torch.compile
    assert megatron.kernels["norm"] == "fused"
    assert titan.tp_overlap == (TORCHTITAN.tp_overlap and titan.compile)      # async TP needs compile
    assert titan.kernels["norm"] == "reference"


@pytest.mark.parametrize("engine, pin, field", [
    ("megatron", {"pp": 2, "schedule": "gpipe"}, "schedule"),
    ("megatron", {"vocab_parallel": True}, "vocab_parallel"),
    ("torchtitan", {"zero": 1}, "zero"),
    ("torchtitan", {"cp": 2, "cp_kind": "ulysses"}, "cp_kind"),
])
def test_a_pin_the_engine_cannot_run_names_the_engine(engine, pin, field):
    with pytest.raises(InputError) as error:
        top_plans(engine, pin)
    text = str(error.value)
    assert f"--fix {field}" in text and ENGINES[engine].title in text
    assert "--engine" in text        # names the engines that run it


@pytest.mark.parametrize("engine", ["megatron", "torchtitan"])
def test_tp_above_the_key_value_heads_is_never_offered_where_the_engine_shards_them(engine):
    model = dataclasses.replace(LLAMA_8B, name="two-kv-heads", kv_heads=2)
    plans = search(model, load_cluster("dgx-h100:1"), TRAIN, {}, top=8, refine=False, engine=engine).plans
    assert plans and all(model.kv_heads % p.tp == 0 for p in plans)
    with pytest.raises(InputError, match="--fix tp"):
        search(model, load_cluster("dgx-h100:1"), TRAIN, {"tp": 4}, top=1, refine=False, engine=engine)


def test_meshplan_prices_replicated_key_value_heads(monkeypatch):
    """tp 8 over 2 key/value heads: each rank holds one whole k and v head per block, as at tp 2 (so going from
    tp 2 to 8 shrinks only q, o and the MLP), and the 4 copies' gradients are summed each step (a positive
    share of the data-parallel term, none at tp 2)."""
    from meshplan.planner import data_parallel
    from meshplan.planner.block import layer_params_per_rank

    model = dataclasses.replace(LLAMA_8B, name="two-kv-heads", kv_heads=2)
    h, f = model.hidden, model.ffn_hidden
    assert layer_params_per_rank(model, 2) - layer_params_per_rank(model, 8) == pytest.approx(
        (2 * h * h + 3 * h * f) * (1 / 2 - 1 / 8))

    def dp_share(tp: int, with_sync: bool) -> float:
        if not with_sync:
            monkeypatch.setattr(data_parallel, "kv_replica_sync_time", lambda s, layout: 0.0)
        plan = search(model, load_cluster("dgx-h100:1"), TRAIN, {"tp": tp, "pp": 1, "cp": 1, "zero": 1}, top=1,
                      refine=False).plans[0]
        monkeypatch.undo()
        return plan.predicted.time_breakdown_s["dp_comm"]

    assert dp_share(8, True) > dp_share(8, False)
    assert dp_share(2, True) == dp_share(2, False)


def test_plan_files_record_their_engine_and_older_files_are_meshplan(tmp_path):
    plan = top_plans("megatron", {"pp": 2}, top=1)[0]
    again = Plan.from_dict(yaml.safe_load(plan.to_yaml()))
    assert again.engine == "megatron" and again.to_yaml() == plan.to_yaml()
    data = yaml.safe_load(top_plans("meshplan", {"pp": 2}, top=1)[0].to_yaml())
    del data["engine"]
    assert Plan.from_dict(data).engine == "meshplan"
    data["attention"] = "unfused"                 # Megatron's; meshplan's runtime runs flash attention only
    with pytest.raises(InputError, match="plan.attention"):
        Plan.from_dict(data)


def test_cli_engine_flag_and_refusal(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "meshplan.cli", "plan", "--model", "llama3-8b", "--cluster",
                               "dgx-h100:2", "--global-batch", "64", "--seq-len", "4096", *args],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)

    ok = run("--engine", "megatron", "--top", "1", "--out", "plan.yaml")
    assert ok.returncode == 0, ok.stderr
    assert "for Megatron-Core" in ok.stdout
    assert yaml.safe_load((tmp_path / "plan.yaml").read_text())["engine"] == "megatron"
    bad = run("--engine", "megatron", "--fix", "pp=2", "--fix", "schedule=gpipe")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --fix schedule"), bad.stderr
    assert "Traceback" not in bad.stderr


def test_docs_engines_page_is_current_and_every_field_has_a_meaning():
    page = (REPO / "docs" / "engines.md").read_text()
    assert gen_engine_docs.rewrite(page) == page, "python scripts/gen_engine_docs.py rewrites docs/engines.md"
    meanings = gen_engine_docs.field_meanings(Engine.__doc__)
    missing = [f.name for f in dataclasses.fields(Engine) if f.name not in meanings]
    assert not missing, f"document these Engine fields in its docstring: {missing}"
    assert MESHPLAN.title in page and MEGATRON.title in page
