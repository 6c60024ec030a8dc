"""Each DVC stage's code dependencies, computed from the imports its module really runs.

`dvc repro` reruns a stage only when one of its declared deps changes, so `dvc.yaml` must list every file of the
package that a stage imports, directly or not (its import closure), or an edit to, say, the seeding in
pipeline/infra/runtime.py would leave pinned results that no longer mean what they say. This tool reads the imports
with `ast` (function-level imports included; nothing is executed) and checks or rewrites the `pipeline/...` deps of
every stage in dvc.yaml. tests/test_layout.py fails when they drift apart.

    python tools/code_deps.py            # print each stage's closure
    python tools/code_deps.py --check    # exit 1 and list the differences if dvc.yaml has drifted
    python tools/code_deps.py --write    # rewrite the pipeline/ entries of dvc.yaml's deps
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"


def module_file(module: str, root: Path = REPO) -> Path | None:
    """The file that defines `module` (a package's __init__.py), or None when it is not part of the package."""
    base = root / Path(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(path: Path, module: str, root: Path = REPO) -> set[str]:
    """Every package module that `path` (the file of `module`) imports, anywhere in its body."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # `from pipeline.core.data import scan` imports the submodule pipeline.core.data.scan
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == PACKAGE and module_file(name, root) is not None:
                found.add(name)
    return found


def closure(module: str, root: Path = REPO) -> set[str]:
    """`module` and every package module it imports, transitively, with the packages' __init__ files."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for name in [current, *_parents(current)]:
            if name in seen or module_file(name, root) is None:
                continue
            seen.add(name)
            todo.extend(imported_modules(module_file(name, root), name, root))
    return seen


def closure_files(module: str, root: Path = REPO) -> list[str]:
    """The closure as sorted repository-relative paths, the form dvc.yaml uses."""
    return sorted(module_file(m, root).relative_to(root).as_posix() for m in closure(module, root))


def stage_modules(dvc_yaml: Path) -> dict[str, str]:
    """{stage name: the pipeline module its cmd runs with `python -m`}."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    found = {}
    for name, body in stages.items():
        cmd = body.get("do", body)["cmd"]
        match = re.search(r"-m\s+(pipeline(?:\.\w+)+)", cmd)
        if match:
            found[name] = match.group(1)
    return found


def declared_code_deps(dvc_yaml: Path) -> dict[str, list[str]]:
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: sorted(d for d in body.get("do", body).get("deps", []) if d.startswith(f"{PACKAGE}/"))
            for name, body in stages.items()}


def drift(dvc_yaml: Path, root: Path = REPO) -> dict[str, tuple[list[str], list[str]]]:
    """{stage: (missing from dvc.yaml, listed but not run)} for every stage whose code deps are wrong."""
    declared = declared_code_deps(dvc_yaml)
    out = {}
    for stage, module in stage_modules(dvc_yaml).items():
        want, have = set(closure_files(module, root)), set(declared.get(stage, []))
        if want != have:
            out[stage] = (sorted(want - have), sorted(have - want))
    return out


def rewrite(dvc_yaml: Path, root: Path = REPO) -> str:
    """dvc.yaml's text with each stage's `pipeline/` deps replaced by its closure, listed after the data deps
    (comments and everything else kept as they are)."""
    modules = stage_modules(dvc_yaml)
    out: list[str] = []
    stage, pending = None, []
    for line in dvc_yaml.read_text().splitlines(keepends=True):
        top = re.match(r"^  (\S[^:]*):", line)
        item = re.match(r"^(\s+)- ", line)
        if pending and not item:  # the deps list ended: the code deps go at its end
            out += pending
            pending = []
        if top:
            stage = top.group(1)
        key = re.match(r"^(\s+)deps:\s*$", line)
        if key and stage in modules:
            indent = key.group(1) + "  "
            pending = [f"{indent}- {f}\n" for f in closure_files(modules[stage], root)]
        elif pending and re.match(rf"^\s+- {PACKAGE}/", line):
            continue
        out.append(line)
    return "".join(out + pending)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python tools/code_deps.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dvc-yaml", type=Path, default=REPO / "dvc.yaml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml's code deps differ from the closures")
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    args = parser.parse_args(argv)
    if args.write:
        args.dvc_yaml.write_text(rewrite(args.dvc_yaml))
        return
    if args.check:
        problems = drift(args.dvc_yaml)
        for stage, (missing, extra) in problems.items():
            print(f"{stage}: missing {missing}; not imported {extra}")
        sys.exit(1 if problems else 0)
    for stage, module in stage_modules(args.dvc_yaml).items():
        print(f"{stage} ({module}):", *closure_files(module), sep="\n  ")


if __name__ == "__main__":
    main()
