"""The package's shape is a promise: stages are thin and nothing imports them, the plumbing imports no library code,
dvc.yaml's code deps are each stage's import closure, and every default has one home (the config dataclasses) that
params.yaml, dvc.yaml and `--help` agree with."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import code_deps  # noqa: E402

from pipeline.infra.config import SECTIONS, defaults, output_keys  # noqa: E402

STAGES = sorted(p.stem for p in (REPO / "pipeline").glob("*.py") if p.stem != "__init__")
# which sections' output keys each DVC stage must list under `params` (heads@item lists its own section)
STAGE_SECTIONS = {"prepare": ["data"], "extract": ["backbone", "extract"], "finetune": ["backbone", "finetune"],
                  "fewshot": ["fewshot"]}


def _package_modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out.append((".".join(parts), path))
    return out


def test_dvc_yaml_code_deps_are_each_stages_import_closure():
    problems = code_deps.drift(REPO / "dvc.yaml")
    assert not problems, f"dvc.yaml code deps drifted (fix: python tools/code_deps.py --write): {problems}"


def test_the_drift_check_sees_a_new_import(tmp_path):
    """The check can fail: give select one more import and its declared deps are no longer its closure."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "pipeline", copy / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "dvc.yaml", copy / "dvc.yaml")
    assert code_deps.drift(copy / "dvc.yaml", copy) == {}
    select = copy / "pipeline" / "select.py"
    select.write_text(select.read_text().replace("from pipeline.core.heads.selection import",
                                                 "from pipeline.core.evaluate import tolerance  # noqa\n"
                                                 "from pipeline.core.heads.selection import", 1))
    drift = code_deps.drift(copy / "dvc.yaml", copy)
    assert drift == {"select": (["pipeline/core/evaluate/__init__.py", "pipeline/core/evaluate/tolerance.py"], [])}
    (copy / "dvc.yaml").write_text(code_deps.rewrite(copy / "dvc.yaml", copy))
    assert code_deps.drift(copy / "dvc.yaml", copy) == {}


def test_closure_follows_function_level_and_package_imports(tmp_path):
    pkg = tmp_path / "pipeline"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from pipeline.core import b\n")
    (pkg / "core" / "b.py").write_text("import os\n")
    (pkg / "stage.py").write_text("from pipeline.core.a import f\n")
    assert code_deps.closure_files("pipeline.stage", tmp_path) == [
        "pipeline/__init__.py", "pipeline/core/__init__.py", "pipeline/core/a.py", "pipeline/core/b.py",
        "pipeline/stage.py"]


def test_nothing_imports_a_stage_and_the_plumbing_imports_no_library():
    stage_modules = {f"pipeline.{s}" for s in STAGES}
    offences = []
    for module, path in _package_modules():
        imported = code_deps.imported_modules(path, module)
        offences += [f"{module} imports stage {m}" for m in imported & stage_modules]
        if module.startswith("pipeline.infra"):
            offences += [f"{module} imports {m}" for m in imported
                         if m.startswith("pipeline.core") or m in stage_modules]
        if module.startswith("pipeline.core"):
            offences += [f"{module} imports {m}" for m in imported if m in stage_modules]
    assert not offences, offences


# The core's subpackages in the order data flows; a module may import its own layer and those before it, never a
# later one (images -> index -> features -> heads -> fine-tune -> evaluation).
LAYERS = ("data", "models", "features", "heads", "finetune", "evaluate")


def _core_graph() -> dict[str, set[str]]:
    """{core module: the core modules it imports, at module level or inside functions}."""
    modules = dict(_package_modules())
    return {m: {i for i in code_deps.imported_modules(p, m) if i.startswith("pipeline.core.") and i != m}
            for m, p in modules.items() if m.startswith("pipeline.core.")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), i.e. the import cycles."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_module_level_or_inside_functions():
    cycles = _cycles(_core_graph())
    assert not cycles, f"import cycles in pipeline/core (function-level imports count): {cycles}"


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_core_layers_import_only_earlier_layers():
    def layer(module: str) -> int | None:
        part = module.split(".")[2]
        return LAYERS.index(part) if part in LAYERS else None

    offences = []
    for module, imported in _core_graph().items():
        mine = layer(module)
        assert mine is not None or module.count(".") == 2, f"{module} is in no layer of {LAYERS}"
        offences += [f"{module} imports {i}" for i in imported
                     if mine is not None and layer(i) is not None and layer(i) > mine]
    assert not offences, f"a layer imports a later one ({' < '.join(LAYERS)}): {offences}"
    assert sorted(p.name for p in (REPO / "pipeline" / "core").iterdir() if p.is_dir() and p.name != "__pycache__") \
        == sorted(LAYERS)


def test_stages_are_thin():
    """A stage module is argument parsing, params and one call into the core: no class, no long function."""
    for stage in STAGES:
        tree = ast.parse((REPO / "pipeline" / f"{stage}.py").read_text())
        classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
        assert not classes, f"pipeline/{stage}.py defines {classes}: move them to pipeline/core"
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
            assert fn.end_lineno - fn.lineno < 45, f"pipeline/{stage}.py:{fn.name} is {fn.end_lineno - fn.lineno} lines"


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: obj}


def test_params_yaml_equals_the_code_defaults_key_for_key():
    in_file = _leaves(yaml.safe_load((REPO / "params.yaml").read_text()))
    in_code = _leaves(defaults())
    assert set(in_file) == set(in_code), set(in_file) ^ set(in_code)
    wrong = {k: (in_file[k], in_code[k]) for k in in_code if in_file[k] != in_code[k]}
    assert not wrong, f"params.yaml vs the config dataclasses (key: file, code): {wrong}"
    assert len(in_code) >= 40  # every key of every section, not a sample


def test_dvc_yaml_lists_exactly_the_keys_that_change_each_output():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, sections in STAGE_SECTIONS.items():
        want = [k for s in sections for k in output_keys(s)]
        assert sorted(stages[stage]["params"]) == sorted(want), stage
    views = output_keys("backbone") + ["extract.precision", "extract.dtype"] + output_keys("extract", "views")
    assert sorted(stages["extract_views"]["params"]) == sorted(views)  # views are always PIL's: no extract.decode
    assert output_keys("extract", "views") == [f"extract.views{s}" for s in ("", "_seed", "_augment", "_hflip",
                                                                              "_crop_scale")]
    heads = stages["heads"]
    assert heads["do"]["params"] == ["heads.${item}"]
    assert heads["foreach"] == list(SECTIONS["heads"].__dataclass_fields__)
    assert not any(k.split(".")[-1] in ("batch_size", "workers", "device", "checkpoint_rows")
                   for k in stages["extract"]["params"])


@pytest.mark.parametrize("stage", ["extract", "heads", "finetune", "prepare", "fewshot"])
def test_help_lists_the_params_with_the_code_defaults(stage):
    out = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    flat = _leaves(defaults())
    sections = {"heads": ["heads.logreg", "heads.mlp"]}.get(stage, STAGE_SECTIONS.get(stage, []))
    for key, value in flat.items():
        if any(key.startswith(s + ".") for s in sections):
            rendered = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            listed = out.split("Params (params.yaml", 1)[1]
            assert re.search(rf"^  {re.escape(key)}( \*)? \({re.escape(rendered)}\)$", listed, re.M), (key, listed)
