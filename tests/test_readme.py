"""README and every command's `--help` are true as written: each command they show is checked against the code.

What is checked, for every command in a code block or an inline code span of README.md, and in the docstring (the
`--help` text) of every `pipeline` command:
- `python -m pipeline.<module> ... --flag`: the module exists and its `--help` lists every flag used;
- `python bench/x.py --flag` / `python tools/x.py --flag`: the script exists and defines the flag;
- `dvc exp run -S key=value`: the key exists, the value passes params.yaml's typed config, and it differs from
  params.yaml's own value (otherwise DVC runs nothing); `dvc repro <target>` / `dvc exp run <target>`: a stage;
- `make <target>`: a Makefile target; paths of code and docs (`pipeline/...`, `bench/...`, `docs/...`): they exist;
- claims of the form "`dvc exp run -S k=v` reruns `a`, `b` and `c`": exactly the stages DVC's own graph makes stale;
- the code map names every module of the package, and the headline table equals `python -m pipeline.summary
  --markdown` on the committed metrics (figures are read from the files, never typed).
The one cheap command is also run: `python -m pipeline.summary`.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.evaluate import summary
from pipeline.infra.config import SECTIONS, build, read_params

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CODE_DIRS = ("pipeline/", "bench/", "tools/", "tests/", "docs/", ".ci/")
SUMMARY_BEGIN, SUMMARY_END = "<!-- summary:begin (python -m pipeline.summary --markdown) -->", "<!-- summary:end -->"


def _snippets(text: str) -> list[str]:
    """Lines of fenced code blocks, and inline code spans outside them."""
    out, outside = [], []
    for i, part in enumerate(re.split(r"^\s*```.*$", text, flags=re.M)):
        (out.extend(part.splitlines()) if i % 2 else outside.append(part))
    out += re.findall(r"`([^`\n]+)`", "\n".join(outside))
    return [s.strip() for s in out if s.strip()]


def _commands(snippets: list[str]) -> list[list[str]]:
    """Each snippet split into shell commands (`&&`, `;`, `|`), comments dropped; unparsable prose is skipped."""
    commands = []
    for snippet in snippets:
        for part in re.split(r"&&|;|\|(?![^\[]*\])", snippet):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            if words and not any("<" in w for w in words):  # `python -m pipeline.<stage>`: a placeholder
                commands.append(words)
    return commands


def _docstring_snippets() -> list[str]:
    """The example lines of every `pipeline` command's docstring (its `--help`), continuation lines joined."""
    out = []
    for path in sorted((REPO / "pipeline").glob("*.py")):
        module = importlib.import_module(f"pipeline.{path.stem}")
        doc = (module.__doc__ or "").replace("\\\n", " ")
        out += [line.strip() for line in doc.splitlines()
                if re.match(r"\s*(python|torchrun|dvc|make)\b", line)]
    return out


ALL = _commands(_snippets(README)) + _commands(_docstring_snippets())


def _module_of(words: list[str]) -> str | None:
    for i, w in enumerate(words[:-1]):
        if w == "-m" and words[i + 1].startswith("pipeline"):
            return words[i + 1]
    return None


@contextlib.contextmanager
def _no_exit():
    try:
        yield
    except SystemExit:
        pass


def _help(module: str, cache: dict[str, str] = {}) -> str:  # noqa: B006 (a cache on purpose)
    if module not in cache:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), _no_exit():
            importlib.import_module(module).main(["--help"])
        cache[module] = buf.getvalue()
    return cache[module]


def _flags(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", w)]


def _check_pipeline_commands(commands: list[list[str]]) -> int:
    seen = [(m, w) for w in commands if (m := _module_of(w))]
    for module, words in seen:
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{module} does not exist: {' '.join(words)}"
        missing = [f for f in _flags(words[words.index(module):]) if f not in _help(module)]
        assert not missing, f"`{' '.join(words)}`: {module} --help has no {missing}"
    return len(seen)


def test_pipeline_commands_exist_and_take_the_flags_shown():
    assert _check_pipeline_commands(ALL) > 20, "the README parser found almost no commands"


def test_scripts_exist_and_define_the_flags_shown():
    for words in ALL:
        scripts = [w for w in words if re.fullmatch(r"(bench|tools|\.ci|\.\./shared/tools)/[\w./-]+\.(py|sh)", w)]
        for script in scripts:
            if script.startswith("../shared/"):
                continue  # the shared tools are outside this repository
            path = REPO / script
            assert path.is_file(), f"`{' '.join(words)}`: {script} does not exist"
            source = path.read_text()
            missing = [f for f in _flags(words[words.index(script):]) if f not in source]
            assert not missing, f"`{' '.join(words)}`: {script} defines no {missing}"


def _stages() -> set[str]:
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return {s.addressing.split(":")[-1] for s in repo.index.stages}


def _set_params(words: list[str]) -> list[tuple[str, str]]:
    return [tuple(words[i + 1].split("=", 1)) for i, w in enumerate(words[:-1])
            if w in ("-S", "--set-param") and "=" in words[i + 1]]


def _check_params(commands: list[list[str]]) -> int:
    """Every `-S key=value` names a real key with a valid value, and each command changes at least one value."""
    params = read_params(REPO / "params.yaml")
    found = 0
    for words in commands:
        if words[:1] != ["dvc"]:
            continue
        changes = []
        for key, text in _set_params(words):
            if "<" in text or "/path/" in text or "..." in text:
                changes.append(True)  # a placeholder for the user's own value
                continue
            found += 1
            section, *path = key.split(".")
            assert section in SECTIONS, f"`{' '.join(words)}`: no params section {section!r}"
            raw = yaml.safe_load(yaml.safe_dump(params))
            node = raw.setdefault(section, {})
            for part in path[:-1]:
                node = node.setdefault(part, {})
            before = node.get(path[-1])
            node[path[-1]] = yaml.safe_load(text)
            build(SECTIONS[section], raw[section], section)  # raises, naming the key, when invalid
            changes.append(node[path[-1]] != before)
        assert not changes or any(changes), (
            f"`{' '.join(words)}`: every value it sets is already params.yaml's: DVC would run nothing")
    return found


def test_dvc_params_are_real_valid_and_change_something():
    assert _check_params(ALL) >= 5


def test_dvc_targets_are_stages_and_make_targets_exist():
    stages = _stages()
    groups = {s.split("@")[0] for s in stages}
    makefile = (REPO / "Makefile").read_text()
    for words in ALL:
        if words[:2] == ["dvc", "repro"] or words[:3] == ["dvc", "exp", "run"]:
            start = 2 if words[1] == "repro" else 3
            targets = [w for w in words[start:] if not w.startswith("-") and "=" not in w
                       and words[words.index(w) - 1] not in ("-S", "--set-param", "-n", "--name")]
            for target in targets:
                assert target in stages | groups, f"`{' '.join(words)}`: no stage {target!r} in dvc.yaml"
        if words[:1] == ["make"]:
            for target in words[1:]:
                if "=" not in target:
                    assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make target {target!r}"


def test_code_and_doc_paths_exist():
    for span in _snippets(README):
        for path in re.findall(r"(?<![\w./])((?:pipeline|bench|tools|tests|docs)/[\w./-]*\w)", span):
            if "<" in path:
                continue
            assert (REPO / path).exists(), f"README names {path}, which does not exist"


def test_code_map_names_every_module():
    tree = README[README.index("## Where the code lives"):]
    tree = tree[:tree.index("\n## ", 5)]
    modules = [p for p in (REPO / "pipeline").rglob("*.py") if p.name != "__init__.py"]
    missing = [str(p.relative_to(REPO)) for p in modules if p.name not in tree]
    assert not missing, f"README's code map does not name {missing}"


def _stale_after(key: str) -> set[str]:
    """The stages DVC reruns after a change of params key `key`: those that list it (or a section holding it) and
    everything downstream of them in DVC's own graph."""
    import networkx as nx
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        graph = repo.index.graph
        direct = set()
        for stage in repo.index.stages:
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    names = dep.params or []
                    if any(key == p or key.startswith(p + ".") for p in names):
                        direct.add(stage)
        stale = set(direct)
        for stage in direct:
            stale |= set(nx.ancestors(graph, stage))  # DVC's edges point from a stage to what it depends on
        return {s.addressing.split(":")[-1] for s in stale}


def test_rerun_claims_match_dvc_graph():
    claims = re.findall(r"`dvc exp run -S ([\w.]+)=[^`]+` reruns ((?:`[\w@-]+`(?:,\s+|\s+and\s+)?)+)", README)
    assert claims, "README states which stages a params change reruns; the test must find that sentence"
    for key, stages in claims:
        assert set(re.findall(r"`([\w@-]+)`", stages)) == _stale_after(key), (key, stages)


def test_summary_table_is_read_from_the_committed_files():
    assert SUMMARY_BEGIN in README and SUMMARY_END in README
    quoted = README[README.index(SUMMARY_BEGIN) + len(SUMMARY_BEGIN):README.index(SUMMARY_END)].strip()
    assert quoted == summary.markdown(REPO / "metrics", REPO / "models" / "selected.json").strip(), (
        "README's headline table differs from the committed metrics: paste `python -m pipeline.summary --markdown`")


def test_summary_command_runs_as_written():
    out = subprocess.run([sys.executable, "-m", "pipeline.summary"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert "fine-tuned network" in out and "head logreg" in out, out


@pytest.mark.parametrize("snippet, problem", [
    ("dvc exp run -S heads.logreg.C='[0.01,0.1,1.0]'", "already params.yaml's"),
    ("dvc exp run -S heads.mlp.hiden=3", "unknown key"),
    ("python -m pipeline.extract --no-such-flag", "has no"),
])
def test_the_checks_catch_a_drifted_readme(snippet: str, problem: str):
    """The checks above fail on what drifted before: a default shown as a variation, a misspelt key, a moved flag."""
    check = _check_pipeline_commands if "python" in snippet else _check_params
    with pytest.raises(Exception, match=problem):
        check(_commands([snippet]))
