"""Every `python scripts/<name>.py ...` command in the README and docs/ parses with that
script's own flags (and, for --config, its config file and overrides), as the shell would
pass it; every `python -c` snippet imports what it names. A documented flag, config field or
function that does not exist fails here."""

import ast
import glob
import importlib
import importlib.util
import os
import re
import shlex
import sys

import pytest
from absl import flags
from tiny_run import REPO

DOCS = sorted([os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "*.md"))])
_INLINE = re.compile(r"`(python [^`]+)`")  # Commands quoted in the prose.
_SCRIPT = re.compile(r"python (scripts/\w+\.py)\b")
_SNIPPET = re.compile(r'python -c "([^"]*)"')
# Where a command ends inside a longer shell line (`a && python ... > log &`, `--command="..."`).
_END = re.compile(r'\s(?:&&|\|\||;|\||>|2>|&)(?:\s|$)|(?<!\\)"|$')


def _blocks(text):
    """The shell code blocks (untagged or bash/sh) and the inline `python ...` spans."""
    blocks, current, tag = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, tag = [], line[3:].strip()
            else:
                if tag in ("", "bash", "sh", "shell"):
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks + _INLINE.findall(text)


def _shell_lines(path):
    for block in _blocks(open(path).read()):
        block = re.sub(r"\\\n\s*", " ", block)  # Continuation lines.
        for line in block.splitlines():
            line = line.split(" # ")[0] if not line.lstrip().startswith("#") else ""
            if line.strip():
                yield line


def _substitute(command):
    """Shell variables -> '0' (a valid int, bucket or path part); keeps flag names intact."""
    return re.sub(r"\$\{?\w+\}?", "0", command)


def documented(pattern):
    found = []
    for path in DOCS:
        for line in _shell_lines(path):
            for match in pattern.finditer(line):
                if pattern is _SCRIPT:
                    rest = line[match.end() :]
                    found.append(
                        (
                            os.path.relpath(path, REPO),
                            match.group(1),
                            rest[: _END.search(rest).start()],
                        )
                    )
                else:
                    found.append((os.path.relpath(path, REPO), match.group(1)))
    return found


COMMANDS = documented(_SCRIPT)
SNIPPETS = documented(_SNIPPET)


def test_the_docs_document_commands_at_all():
    assert len(COMMANDS) >= 25 and len(SNIPPETS) >= 1
    assert {"scripts/train.py", "scripts/evaluate.py", "scripts/predict.py"} <= {
        script for _, script, _ in COMMANDS
    }
    assert any(doc == "docs/tpu.md" for doc, *_ in COMMANDS)


@pytest.mark.parametrize(
    "doc,script,args", COMMANDS, ids=[f"{d}:{s}:{i}" for i, (d, s, _) in enumerate(COMMANDS)]
)
def test_documented_command_parses(doc, script, args, monkeypatch):
    monkeypatch.chdir(REPO)  # The docs run scripts from the repository root.
    argv = [a for a in shlex.split(_substitute(args)) if a.startswith("--")]
    monkeypatch.setattr(sys, "argv", [script, *argv])  # config_flags reads its overrides here.
    spec = importlib.util.spec_from_file_location(f"_doc_{os.path.basename(script)}", script)
    module = importlib.util.module_from_spec(spec)
    before, was_parsed = set(flags.FLAGS), flags.FLAGS.is_parsed()
    try:
        spec.loader.exec_module(module)
        try:
            flags.FLAGS([script, *argv])
        except flags.Error as e:
            pytest.fail(f"{doc}: python {script} {args}\n  {e}")
        if any(a.startswith("--config=") for a in argv):  # Loaded, overrides applied.
            assert flags.FLAGS.config is not None
    finally:
        for flag in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, flag)
        if not was_parsed:
            flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("doc,code", SNIPPETS)
def test_documented_python_snippet_names_what_exists(doc, code):
    tree = ast.parse(code)
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:  # `from package import module` or `... import name`
                module = importlib.import_module(node.module)
                value = getattr(module, alias.name, None)
                if value is None:
                    value = importlib.import_module(f"{node.module}.{alias.name}")
                imported[alias.asname or alias.name] = value
    attributes = [
        n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
    ]
    assert imported, f"{doc}: the snippet imports nothing from the project: {code}"
    for node in attributes:
        if node.value.id in imported:
            assert hasattr(imported[node.value.id], node.attr), f"{doc}: {code}"
