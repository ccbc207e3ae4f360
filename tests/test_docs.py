"""The documentation: every relative link resolves, the README's commands are the ones CI runs, and
the README's quickstart runs as written."""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(text: str) -> list[str]:
    """The link targets of a Markdown text that point into the repository (no scheme, no pure anchor)."""
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_relative_links_finds_what_it_should():
    text = "[a](docs/a.md) ![b](b.png) [c](https://x.org/c) [d](#anchor) [e](e.md#part) [f](mailto:f@x)"
    assert relative_links(text) == ["docs/a.md", "b.png", "e.md#part"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_the_readme_names_the_commands_ci_runs():
    commands = _section((ROOT / "README.md").read_text(), "Two commands")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test " in commands and "make demo " in commands


def test_the_readme_quickstart_trains(tmp_path):
    quickstart = _section((ROOT / "README.md").read_text(), "Quickstart")
    code = re.search(r"```python\n(.*?)```", quickstart, re.S).group(1)
    assert "PurifyLayer" in code and ".backward()" in code
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"loss \d+\.\d{3}, strength -?\d+\.\d{3}\n", done.stdout), done.stdout


def test_every_path_in_the_readme_file_map_exists():
    block = re.search(r"\n    (.*?)\n\n", _section((ROOT / "README.md").read_text(), "File map") + "\n\n", re.S).group(1)
    paths = [line.split()[0] for line in block.splitlines() if line.strip()]
    assert len(paths) > 20
    missing = [p for p in paths if not list(ROOT.glob(p.rstrip("/")))]
    assert not missing, f"the README's file map names paths that do not exist: {missing}"
