"""The docs site builds with `mkdocs build --strict`, whose strictness catches broken links,
links to missing headings and pages left out of the nav; the README stays short, and its links
into the docs resolve."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MAX_BYTES = 15_000
LINK = re.compile(r"\]\(([^)\s]+)\)")


def build(project: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """`mkdocs build --strict` of `project`, as CI runs it (offline: no plugin fetches)."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=project,
        env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_docs_build_strictly(tmp_path: Path) -> None:
    done = build(ROOT, tmp_path)

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "index.html").exists()
    assert (tmp_path / "operations" / "runbooks" / "VoicecloneWorkerDown" / "index.html").exists()


def test_broken_links_and_pages_out_of_the_nav_fail_the_build(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(ROOT / "docs", project / "docs")
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    with (project / "docs" / "using.md").open("a") as page:
        page.write("\n[gone](no-such-page.md) and [nowhere](contracts.md#no-such-heading)\n")
    (project / "docs" / "stray.md").write_text("# Not in the nav\n")

    done = build(project, tmp_path / "site")

    assert done.returncode != 0
    assert "no-such-page.md" in done.stderr
    assert "does not contain an anchor '#no-such-heading'" in done.stderr
    assert "stray.md" in done.stderr


def test_the_readme_stays_short() -> None:
    assert len(README.read_bytes()) <= README_MAX_BYTES


def test_the_readme_links_resolve() -> None:
    links = [link for link in LINK.findall(README.read_text()) if "://" not in link]

    assert links, "the README links into the docs"
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.is_file(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), flags=re.MULTILINE)
            assert anchor in {slugify(heading, "-") for heading in headings}, link
