"""The documentation stays in step with the code and inside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from shadowquant.config_reference import REGENERATE, render_reference

REPO = Path(__file__).resolve().parents[1]
README_LIMIT_BYTES = 12_000
# The pages whose links must resolve: the front page, docs/, and the READMEs beside code.
PAGES = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")),
         "bench/README.md", "config/README.md"]
# [text](target) and ![alt](target); the target ends at whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
# A sibling checkout of the project's working files: a path that exists on one machine only.
OUTSIDE_PATH = re.compile(r"\.\./" + "shared")


def _prose(text: str) -> str:
    """Markdown without code blocks and code spans, where link syntax is only an example."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as '-', repeats numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", markdown).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _broken_links(source: Path, root: Path = REPO) -> list[str]:
    """Relative links of the markdown file `source` that leave `root`, name a missing file or heading."""
    page = source.relative_to(root).as_posix()
    problems = []
    for target in LINK.findall(_prose(source.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (source.parent / path_part).resolve() if path_part else source
        if root not in resolved.parents and resolved != root:
            problems.append(f"{page}: link '{target}' leaves the repository")
        elif not resolved.exists():
            problems.append(f"{page}: link '{target}' names a missing file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved.read_text(encoding="utf-8")):
            problems.append(f"{page}: link '{target}' names a missing heading")
    return problems


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc}); the tracked files cannot be listed")
    return [REPO / name for name in out.decode().split("\0") if name]


def test_configuration_reference_is_generated_from_the_schema():
    current = (REPO / "docs/configuration.md").read_text(encoding="utf-8")
    assert current == render_reference(), f"docs/configuration.md is stale; regenerate it: {REGENERATE}"


def test_reference_check_command_reports_a_stale_file(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text(render_reference().replace("| `model.name` |", "| `model.old_name` |"), encoding="utf-8")
    command = [sys.executable, "-m", "shadowquant.config_reference", "--check"]
    proc = subprocess.run([*command, str(stale)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and REGENERATE in proc.stderr
    fresh = tmp_path / "fresh.md"
    fresh.write_text(render_reference(), encoding="utf-8")
    assert subprocess.run([*command, str(fresh)], capture_output=True).returncode == 0


def test_reference_lists_every_schema_key_with_its_default():
    schema = {
        "description": "A test schema.",
        "properties": {
            "part": {"type": "object", "description": "A section.", "properties": {
                "count": {"type": "integer", "minimum": 1, "default": 3, "description": "How many."},
                "mode": {"enum": ["a", "b|c"], "default": "a", "description": "Which | one."},
                "inner": {"type": "object", "properties": {
                    "flag": {"type": "boolean", "default": False, "description": "On or off."}}},
            }},
            "level": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"const": "auto"}],
                      "default": "auto", "description": "A level."},
            "names": {"type": "array", "items": {"type": "string"}, "default": ["x y", "null"]},
        },
    }
    text = render_reference(schema)
    assert "## `part`\n\nA section.\n" in text
    assert "| `part.count` | integer | `3` | >= 1 | How many. |" in text
    assert "| `part.mode` | string | `a` | `a`, `b\\|c` | Which \\| one. |" in text
    assert "| `part.inner.flag` | boolean | `false` |  | On or off. |" in text
    assert "| `level` | number or `auto` | `auto` | > 0; or `auto` | A level. |" in text
    assert '| `names` | list of string | `[x y, "null"]` |  |  |' in text


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    assert (REPO / page).is_file(), f"{page} is missing"
    assert _broken_links(REPO / page) == []


def test_link_check_finds_broken_links(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs/usage.md").write_text("# Usage\n\n## What reruns when\n", encoding="utf-8")
    page = root / "docs/page.md"
    page.write_text("[ok](usage.md#what-reruns-when) [gone](nowhere.md) [bad](usage.md#no-such-heading)\n"
                    "[out](../../elsewhere.md) [web](https://example.com) `[code](x.md)`\n"
                    "```\n[block](y.md)\n```\n", encoding="utf-8")
    assert _broken_links(page, root) == [
        "docs/page.md: link 'nowhere.md' names a missing file",
        "docs/page.md: link 'usage.md#no-such-heading' names a missing heading",
        "docs/page.md: link '../../elsewhere.md' leaves the repository",
    ]


def test_readme_links_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    linked = {target.partition("#")[0] for target in LINK.findall(readme)}
    pages = {p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")}
    assert pages - linked == set(), "README.md should link every page of docs/"


def test_no_tracked_file_points_outside_the_repository():
    offenders = []
    for path in _tracked_files():
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):  # deleted in the work tree, or a submodule
            continue
        if b"\0" in data:
            continue  # binary
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE_PATH.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}")
    assert offenders == [], "paths outside the repository: " + ", ".join(offenders)


def test_readme_is_a_front_page_that_opens_with_the_two_commands():
    readme = (REPO / "README.md").read_bytes()
    assert len(readme) <= README_LIMIT_BYTES, f"README.md is {len(readme)} bytes; move detail into docs/"
    text = readme.decode("utf-8")
    before, fence, rest = text.partition("```")
    assert fence and "\n## " not in before, "the first code block must come before any section"
    block = rest.split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()[1:] if line.strip()]
    assert commands == ["make run", "make test"]
    assert all("#" in line for line in block.splitlines()[1:] if line.strip()), "each command needs its one-line note"
