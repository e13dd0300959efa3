"""The repository explains itself, inside itself.

- Every relative link of every Markdown file git tracks (README, docs/, bench/, converters/README.md,
  CONTRIBUTING.md, MODEL_CARD.md, ...) names a file or folder of the repository, and its #anchor, if any, a heading
  of that file (GitHub's anchors: lower case, punctuation dropped, spaces as '-').
- Every repository path a tracked file names in text: `docs/...` anywhere (the code's pointers to its
  documentation included), and in Markdown the paths written in backticks that start with one of the repository's
  folders (`runtime/speed.py`, `bench/RESULTS.md`): each exists, or lies in a folder the build or a benchmark
  makes (build/, bench/out/, tests/.fixtures/, third_party/).
- No tracked file points outside the repository: to the design notes of the machine it was written on (their
  folder beside the repository, or their documents by name where no such file is in the repository), to an absolute path of that
  machine (a workspace, home or temporary folder, a file:// URL), or to a package mirror's host.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folders the build, the benchmarks or the tests make: a path into them is not expected in a clean checkout
GENERATED = ("build/", "bench/out/", "tests/.fixtures/", "third_party/", "dist/")
TOP_FOLDERS = (
    "apps",
    "bench",
    "cache_policies",
    "cmake",
    "converters",
    "csrc",
    "docs",
    "runtime",
    "src/moelite",
    "tests",
    "tools",
)


def tracked_files() -> list[Path]:
    """Files git tracks (in the index: a new document counts once it is added)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    names = sorted({n for n in out.decode().split("\0") if n and not n.startswith("third_party/")})
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary (the demo GGUF, PNGs)
    return data.decode("utf-8", errors="replace")


def markdown_files() -> list[Path]:
    return [p for p in tracked_files() if p.suffix == ".md"]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --- Markdown -------------------------------------------------------------------------------------------------
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def prose(md: str) -> str:
    """The Markdown without its code: fenced blocks and inline code spans (links there are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", md))


def links(md: str) -> list[str]:
    text = prose(md)
    return LINK.findall(text) + REF_DEF.findall(text)


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def anchors(md: str) -> set[str]:
    """GitHub's heading anchors of a Markdown text."""
    out, seen = set(), {}
    for title in HEADING.findall(FENCE.sub("", md)):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_link(source: Path, target: str) -> str | None:
    """Why a relative link of `source` does not resolve, or None."""
    path_part, _, anchor = target.partition("#")
    dest = (source.parent / path_part).resolve() if path_part else source
    try:
        dest.relative_to(ROOT)
    except ValueError:
        return "points outside the repository"
    if not dest.exists():
        return "no such file"
    if anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest.read_text(encoding="utf-8")):
        return f"no heading #{anchor} in {rel(dest)}"
    return None


def test_every_relative_markdown_link_resolves():
    files = markdown_files()
    assert ROOT / "README.md" in files and ROOT / "CONTRIBUTING.md" in files
    bad, n = [], 0
    for md in files:
        for target in links(md.read_text(encoding="utf-8")):
            if is_external(target):
                continue
            n += 1
            why = broken_link(md, target)
            if why:
                bad.append(f"{rel(md)}: ({target}) {why}")
    assert n > 50, f"only {n} relative links found: the link pattern no longer matches the documents"
    assert not bad, "broken links:\n" + "\n".join(bad)


# --- paths named in text ----------------------------------------------------------------------------------------
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*\w")
CODE_SPAN_PATH = re.compile(r"`((?:" + "|".join(TOP_FOLDERS) + r")/[\w./-]*\.\w+)`")


def missing(path: str) -> bool:
    path = path.rstrip(".")
    return not path.startswith(GENERATED) and not (ROOT / path).exists()


def test_every_repository_path_named_in_text_exists():
    bad, n_docs = [], 0
    for f in tracked_files():
        text = text_of(f)
        if text is None:
            continue
        named = set(DOCS_PATH.findall(text))
        n_docs += len(named)
        if f.suffix == ".md":
            named |= set(CODE_SPAN_PATH.findall(text))
        bad += [f"{rel(f)}: {p}" for p in sorted(named) if missing(p)]
    assert n_docs > 20, f"only {n_docs} docs/ paths named: the pattern no longer matches"
    assert not bad, "paths that do not exist in the repository:\n" + "\n".join(bad)


def test_readme_first_screen_guides():
    """The README's first 40 lines: what moelite is, the two commands, how to run your own model (a GGUF, a split
    set, a Hugging Face directory) and where the documentation is."""
    first = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:40])
    assert re.search(r"Mixture-of-Experts", first)
    assert 'pip install . && moelite run --chat -p "What is Python?" -n 48' in first
    assert 'pip install ".[test]" && python -m pytest -q' in first
    assert re.search(r"\.gguf ", first) and re.search(r"-00001-of-\d{5}\.gguf", first)
    assert re.search(r"moelite \w+ \./\S+", first), "a Hugging Face directory as MODEL"
    assert len(re.findall(r"\]\(docs/\w+\.md\)", first)) >= 5, "links into docs/"


def test_code_points_to_the_docs():
    """`moelite --help` ends with where the documentation is, and that is in the repository."""
    from moelite.apps.cli import build_parser

    epilog = build_parser().format_help().strip().splitlines()[-2:]
    named = DOCS_PATH.findall(" ".join(epilog))
    assert named and all((ROOT / p.rstrip(".")).is_file() for p in named), epilog


# --- nothing outside the repository ------------------------------------------------------------------------------
# The design notes engineers keep beside the repository, by name. A mention is fine where it names a file of the
# repository: relative to the file that mentions it, or to the repository's root.
DESIGN_NOTE = re.compile(r"(?<![\w-])((?:[\w.-]+/)*(?:DESIGN|FAMILIES[A-Z0-9_]*|ROUTING_METRICS|CORPORA|STYLE)\.md)")
NOTES_DIR = "shared"  # their folder, beside the repository's
OUTSIDE = [
    (
        re.compile(r"(?<![\w-])" + NOTES_DIR + r"/(?=[A-Z]\w*\.md)|\.\./" + NOTES_DIR + r"\b"),
        "the design notes' folder",
    ),
    (re.compile(r"(?<![\w.~$}-])/(?:work|home|root|tmp|opt|mnt|srv|Users)/"), "an absolute path of a machine"),
    (re.compile(r"file:/{3}"), "a file:// URL"),
    (
        re.compile(
            r"\b(?:(?:deb|ftp|security|snapshot|ftp\.[a-z]{2})\.debian\.org|(?:archive|security|ports)\.ubuntu\.com"
            r"|pypi\.org|files\.pythonhosted\.org|download\.pytorch\.org|conda\.anaconda\.org|repo\.anaconda\.com"
            r"|mirrors?\.[\w-]+\.\w+)\b",
            re.I,
        ),
        "a package mirror's host",
    ),
]


def design_note_missing(f: Path, name: str) -> bool:
    return not any((base / name).is_file() for base in (f.parent, ROOT))


def test_nothing_points_outside_the_repository():
    bad = []
    for f in tracked_files():
        text = text_of(f)
        if text is None:
            continue
        for no, line in enumerate(text.splitlines(), 1):
            for pattern, what in OUTSIDE:
                if m := pattern.search(line):
                    bad.append(f"{rel(f)}:{no}: {what}: {m.group(0)!r}")
            for name in DESIGN_NOTE.findall(line):
                if design_note_missing(f, name):
                    bad.append(f"{rel(f)}:{no}: a design note outside the repository: {name!r}")
    assert not bad, "\n".join(dict.fromkeys(bad))


def test_the_checks_see_what_they_look_for(tmp_path):
    """The patterns on lines written here (assembled, so that this file does not hold them)."""
    home = "/" + "home/someone/x.py"
    assert OUTSIDE[1][0].search(f"default = '{home}'")
    assert not OUTSIDE[1][0].search("build/arm64-root/usr/include and ~/.cache/moelite")
    assert OUTSIDE[3][0].search("mmdebstrap bookworm root http://deb." + "debian" + ".org/debian")
    assert OUTSIDE[0][0].search(f"see ../{NOTES_DIR}/DESIGN" + ".md")
    wave2, in_docs = "FAMILIES_WAVE2" + ".md", "docs/" + "FAMILIES" + ".md"
    assert DESIGN_NOTE.findall(f"see {wave2} and {in_docs}") == [wave2, in_docs]
    assert design_note_missing(ROOT / "tests" / "x.py", wave2)
    md = tmp_path / "a.md"
    md.write_text("# A `b` title, with: punctuation\n\n## Twice\n\n## Twice\n")
    assert anchors(md.read_text()) == {"a-b-title-with-punctuation", "twice", "twice-1"}
    text = '[x](a.md#twice-1) `[y](nowhere.md)` ![img](pic.png "t")\n```\n[z](gone.md)\n```\n[r]: ref.md\n'
    assert links(text) == ["a.md#twice-1", "pic.png", "ref.md"]
    readme = ROOT / "README.md"
    assert broken_link(readme, "docs/ARCHITECTURE.md#the-expert-cache") is None
    assert broken_link(readme, "docs/ARCHITECTURE.md#no-such-heading").startswith("no heading")
    assert broken_link(readme, "docs/" + "NO_SUCH_PAGE.md") == "no such file"
    assert broken_link(readme, "../elsewhere.md") == "points outside the repository"
