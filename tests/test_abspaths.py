"""No committed notebook, JSON or Markdown file holds an absolute filesystem path (a machine's folder)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# "/<dir>/<dir>/..." inside text, not preceded by a word character, '.', ':', '/' or '~' (so URLs, relative paths
# and "~/.cache/..." do not count)
ABSOLUTE = re.compile(r"(?<![\w.:/~])/(?:[A-Za-z0-9_.-]+/){2,}[A-Za-z0-9_.-]*")
ALLOWED = ("/usr/share/", "/dev/", "/proc/", "/sys/")  # the same on every Linux machine
WINDOWS = re.compile(r"(?<![\w])[A-Za-z]:\\\\?(?:Users|home)\\\\")


def committed_files() -> list[Path]:
    """Tracked files and new ones not ignored (what the next commit would hold)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.ipynb",
                              "*.json", "*.md"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / f for f in dict.fromkeys(out.splitlines()) if (REPO / f).is_file()]


def absolute_paths(text: str) -> list[str]:
    hits = [m for m in ABSOLUTE.findall(text) if not m.startswith(ALLOWED)]
    return hits + WINDOWS.findall(text)


def test_the_pattern():
    assert absolute_paths('data_dir = "/work/shared/data"') == ["/work/shared/data"]
    assert absolute_paths("wrote /home/me/earlyexit/results/x.json") == ["/home/me/earlyexit/results/x.json"]
    assert absolute_paths(r'"C:\\Users\\me\\data"')
    assert not absolute_paths("see https://github.com/a/b/c, ../shared/docs/protocols.md, ~/.cache/earlyexit/x, "
                              "results/dola_mc_smollm2-135m.json, 1/2/3 of the depth, /dev/null, /proc/self/status")


def test_no_committed_file_holds_an_absolute_path():
    files = committed_files()
    assert any(f.suffix == ".ipynb" for f in files)
    found = {}
    for f in files:
        hits = absolute_paths(f.read_text(encoding="utf-8", errors="replace"))
        if hits:
            found[str(f.relative_to(REPO))] = hits[:3]
    assert not found, f"absolute paths in committed files (print paths relative to the repository): {found}"
