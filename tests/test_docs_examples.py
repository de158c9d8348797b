"""Every `qlorax ...` example in README.md and docs/*.md is a valid command, and every relative
link there points at a file (and heading) that exists.

Examples come from fenced shell blocks and from inline code (tables and prose). Each is checked
against the CLI's real command tree (typer's click commands, built as `qlorax` builds them when
it runs; no torch is imported):

- the subcommand path exists (`qlorax config show`, not `qlorax config shw`);
- a concrete command (a fenced one without `[...]`, `a|b` or `...`) is parsed by the command's own
  option parser: unknown options, options missing their value, extra or missing arguments fail;
- a synopsis (`qlorax train [--config C] --output-dir DIR ...`) has every option it names among
  that command's options;
- the cheap ones (`--help`, `version`, `config show`, `config schema`) run for real and must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
SHELL_OPERATORS = {"&&", "||", ";", "|", ">", ">>", "<", "2>", "2>&1", "&"}
SYNOPSIS_MARKERS = ("[", "]", "|", "...", "…")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")  # COMMAND in `qlorax COMMAND --help`
OPTION = re.compile(r"(?<![\w./:=+-])(--?[A-Za-z][\w-]*)")
CHEAP = {("version",), ("config", "show"), ("config", "show", "--json"), ("config", "schema")}
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Example:
    where: str  # file:line
    text: str  # the command as written, from `qlorax` on
    fenced: bool

    @property
    def synopsis(self) -> bool:
        return any(marker in self.text for marker in SYNOPSIS_MARKERS)


def _is_qlorax(token: str) -> bool:
    return os.path.basename(token) == "qlorax"


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def extract_examples(text: str, name: str) -> list[Example]:
    examples: list[Example] = []
    prose = text
    for fence in FENCE.finditer(text):
        prose = prose.replace(fence.group(0), "\n" * fence.group(0).count("\n"), 1)
        if fence.group(1).strip().lower() not in SHELL_FENCES:
            continue
        start = _line_of(text, fence.start(2))
        lines: list[tuple[int, str]] = []  # (first line number, command): continuations joined
        current, first = "", start
        for i, raw in enumerate(fence.group(2).split("\n")):
            if not current:
                first = start + i
            if raw.rstrip().endswith("\\"):
                current += raw.rstrip()[:-1] + " "
                continue
            lines.append((first, current + raw))
            current = ""
        for line_no, line in lines:
            if "qlorax" not in line:
                continue
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                tokens = line.split()
            for k, token in enumerate(tokens):
                if _is_qlorax(token):
                    rest = []
                    for tok in tokens[k + 1:]:
                        if tok in SHELL_OPERATORS:
                            break
                        rest.append(tok)
                    examples.append(Example(f"{name}:{line_no}", shlex.join(["qlorax", *rest]), True))
                    break
    for code in INLINE.finditer(prose):
        content = code.group(1).replace("\\|", "|").strip()
        first = content.split(maxsplit=1)[0] if content else ""
        if _is_qlorax(first) and content != first:  # a bare `qlorax` is the name, not a command
            examples.append(Example(f"{name}:{_line_of(prose, code.start())}",
                                    "qlorax" + content[len(first):], False))
    return examples


def all_examples() -> list[Example]:
    out: list[Example] = []
    for path in doc_files():
        out += extract_examples(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    return out


# --------------------------------------------------------------------------- the CLI's commands

def cli_root():
    """The `qlorax` command as the console script builds it (typer -> click), without running it."""
    import typer.main

    from qlorax import cli

    return typer.main.get_command(cli.app)


def _option_names(command, ctx=None) -> set[str]:
    params = command.get_params(ctx) if ctx is not None else command.params
    names = {"--help"}
    for param in params:
        if param.param_type_name == "option":
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def _resolve(root, words: list[str]):
    """Walk the global options and the subcommand path; returns (command, remaining words,
    path, error). command is None when a placeholder such as COMMAND stands for any command."""
    command, path = root, ["qlorax"]
    rest = list(words)
    while rest and rest[0].startswith("-") and rest[0] in _option_names(root) and command is root:
        if rest[0] == "--help":
            break
        rest.pop(0)
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        word = rest[0]
        if PLACEHOLDER.match(word):
            return None, rest[1:], path, None
        if word not in command.commands:
            return command, rest, path, f"no command {word!r} under `{' '.join(path)}` " \
                                        f"(known: {', '.join(sorted(command.commands))})"
        command = command.commands[word]
        path.append(word)
        rest.pop(0)
    return command, rest, path, None


def _context(command, path: list[str]):
    return command.context_class(command, info_name=path[-1])


def check_example(root, example: Example) -> list[str]:
    """Problems with one example (empty when it is valid)."""
    try:
        words = shlex.split(example.text)[1:]
    except ValueError:
        words = example.text.split()[1:]
    if example.synopsis or not example.fenced:
        words = example.text.split()[1:]
    command, rest, path, error = _resolve(root, words)
    if error:
        return [error]
    if command is None:  # `qlorax COMMAND --help`: any command
        return []
    known = _option_names(command, _context(command, path))
    problems = []
    if example.synopsis or not example.fenced:
        for option in OPTION.findall(" ".join(rest)):
            if option not in known:
                problems.append(f"`{' '.join(path)}` has no option {option} (it has: {', '.join(sorted(known))})")
        return problems
    if hasattr(command, "commands"):  # a group named alone, or with --help
        extra = [w for w in rest if w != "--help"]
        return [f"`{' '.join(path)}` needs a subcommand, got {extra}"] if extra else []
    ctx = _context(command, path)
    try:
        values, leftover, _ = command.make_parser(ctx).parse_args(args=list(rest))
    except Exception as exc:  # click's UsageError family: unknown option, missing value
        return [f"`{' '.join(path)}`: {exc}"]
    if leftover:
        problems.append(f"`{' '.join(path)}`: unexpected arguments {leftover}")
    if not values.get("help"):
        for param in command.params:
            if param.param_type_name == "argument" and param.required and values.get(param.name) in (None, ()):
                problems.append(f"`{' '.join(path)}`: missing argument {param.name.upper()}")
    return problems


def cheap_args(root, example: Example) -> tuple[str, ...] | None:
    """The arguments to run for real, when the example is concrete and cheap."""
    if example.synopsis:
        return None
    try:
        args = tuple(shlex.split(example.text)[1:])
    except ValueError:
        return None
    if args in CHEAP or (args and args[-1] == "--help" and not any(PLACEHOLDER.match(a) for a in args)):
        return args
    return None


# --------------------------------------------------------------------------- links

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def link_problems(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    prose = INLINE.sub("", FENCE.sub("", text))
    problems = []
    for match in LINK.finditer(prose):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO)}: ({target})"
        if not resolved.exists():
            problems.append(f"{where} points at a missing file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    return problems


# --------------------------------------------------------------------------- the tests

def test_cli_parser_does_not_import_torch():
    code = "import sys, typer.main, qlorax.cli; typer.main.get_command(qlorax.cli.app); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_docs_have_examples_and_the_core_ones():
    examples = all_examples()
    assert len(examples) > 50, "the extraction found almost no examples: is the pattern broken?"
    texts = {e.text for e in examples}
    for needed in ("qlorax --help", "qlorax config show", "qlorax config schema"):
        assert needed in texts, f"{needed!r} is documented nowhere"
    documented = {e.text.split()[1] for e in examples if len(e.text.split()) > 1}
    missing = set(cli_root().commands) - documented
    assert not missing, f"commands with no example in README.md or docs/: {sorted(missing)}"


def test_every_command_example_is_valid():
    root = cli_root()
    problems = [f"{e.where}: {e.text}\n    {p}" for e in all_examples() for p in check_example(root, e)]
    assert not problems, "invalid command examples:\n" + "\n".join(problems)


def test_cheap_examples_run(tmp_path):
    root = cli_root()
    runs = {}
    for example in all_examples():
        args = cheap_args(root, example)
        if args is not None and not check_example(root, example):
            runs.setdefault(args, example.where)
    assert {("--help",), ("config", "show"), ("config", "schema")} <= set(runs), sorted(runs)
    script = Path(sys.executable).with_name("qlorax")
    prefix = [str(script)] if script.exists() else [sys.executable, "-c", "from qlorax.cli import main; main()"]
    env = {**os.environ, "QLORAX_HOME": str(tmp_path / "home"), "QLORAX_CACHE_DIR": str(tmp_path / "cache")}
    failures = []
    for args, where in sorted(runs.items()):
        out = subprocess.run([*prefix, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
        if out.returncode != 0:
            failures.append(f"{where}: qlorax {' '.join(args)} -> exit {out.returncode}\n{out.stderr[-2000:]}")
    assert not failures, "\n".join(failures)


def test_relative_links_resolve():
    problems = [p for path in doc_files() for p in link_problems(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("bad", [
    "```bash\nqlorax train --output-dir runs/x --no-such-option\n```",
    "```bash\nqlorax trian --output-dir runs/x\n```",
    "```bash\nqlorax check\n```",
    "```bash\nqlorax gc --older-than\n```",
    "```bash\nqlorax config show a.yaml b.yaml\n```",
    "| `qlorax verify [--runs N] [--thread 1,2]` | x |",
    "see `qlorax config shw`",
])
def test_the_checker_catches_a_wrong_example(bad):
    root = cli_root()
    examples = extract_examples(bad, "bad.md")
    assert len(examples) == 1
    assert check_example(root, examples[0]), f"not caught: {bad}"


def test_the_link_checker_catches_a_broken_link(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Some section\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#some-section) [gone](docs/b.md) [bad anchor](docs/a.md#nope) "
                    "[web](https://example.com/x.md) `[code](not/a/link.md)`\n", encoding="utf-8")
    problems = link_problems(page)
    assert len(problems) == 2 and "docs/b.md" in problems[0] and "#nope" in problems[1], problems
