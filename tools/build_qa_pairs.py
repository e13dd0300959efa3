"""Build question/answer pairs for instruction-tuning the demo MoE (issue 19). Dev-only.

Every pair comes from text already on the machine or in the demo's Debian packages (tools/train_demo.py --fetch):
  stdlib   Python standard library docstrings, read with `ast` (nothing is imported):
           "What does json.dumps do?" / "What is the json module for?" -> the docstring's first sentences
  foldoc   the Free On-line Dictionary of Computing (Debian `dict-foldoc`): "What is Debian?" -> the
           entry's first sentences, markup removed
  debian   package descriptions (`/var/lib/dpkg/status` long descriptions, `apt-cache dumpavail` short ones):
           "What is the Debian package coreutils for?" -> short description + first sentence of the long one
  man      man pages (`/usr/share/man/man[18]`): "What does the ls command do?" -> the NAME line, plus the
           first sentence of DESCRIPTION when it parses cleanly

Deterministic: inputs are read in sorted order, the held-out split and the per-source cap are decided by a
hash of the question. Output: <out>/train.jsonl and <out>/heldout.jsonl, one {source, question, answer} per line.

  python tools/build_qa_pairs.py --raw-dir build/demo_corpus/raw --out build/demo_qa
"""

from __future__ import annotations

import argparse
import ast
import glob
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig

FOLDOC = "usr/share/dictd/foldoc.dict.dz"
SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]'\"`])[.!?](?=\s+[A-Z(`'\"]|\s*$)")


def stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha1(s.encode()).digest()[:8], "little")


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def first_sentences(text: str, max_sentences: int = 2, max_chars: int = 240) -> str:
    """The leading whole sentences of one paragraph (at most max_chars), ending with a period; '' if the
    first sentence alone is too long or too short."""
    text = squash(text)
    out = ""
    for n, m in enumerate(SENTENCE_END.finditer(text)):
        candidate = text[: m.end()].strip()
        if len(candidate) > max_chars or n >= max_sentences:
            break
        out = candidate
    if not out and len(text) <= max_chars and text:
        out = text if text[-1] in ".!?" else text + "."
    return out if len(out) >= 12 else ""


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------


def stdlib_pairs(stdlib: str):
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "__pycache__")
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, stdlib)[:-3]
        parts = rel.split(os.sep)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(p in skip or p.startswith("_") for p in parts):
            continue
        mod = ".".join(parts)
        try:
            tree = ast.parse(open(path, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        doc = docstring_answer(ast.get_docstring(tree), mod.rsplit(".", 1)[-1])
        if doc:
            yield "stdlib", f"What is the Python module {mod} for?", doc
        for node in tree.body:
            yield from definition_pairs(node, mod)
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for sub in node.body:
                    yield from definition_pairs(sub, f"{mod}.{node.name}")


def definition_pairs(node, prefix: str):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
        return
    doc = docstring_answer(ast.get_docstring(node), node.name)
    if doc:
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        q = (
            f"What does the {kind} {prefix}.{node.name} do?"
            if kind == "function"
            else f"What is the class {prefix}.{node.name}?"
        )
        yield "stdlib", q, doc


def docstring_answer(doc: str | None, name: str) -> str:
    if not doc:
        return ""
    para = doc.strip().split("\n\n")[0]
    if re.match(rf"{re.escape(name)}\s*\(", para) or ">>>" in para or ":param" in para:
        return ""  # a signature line or a doctest, not prose
    return first_sentences(para)


def fetch_foldoc(raw_dir: str) -> None:
    debs = os.path.join(raw_dir, "debs")
    os.makedirs(debs, exist_ok=True)
    if not glob.glob(os.path.join(debs, "dict-foldoc_*.deb")):
        subprocess.run(["apt-get", "download", "dict-foldoc"], cwd=debs, check=True)
    deb = sorted(glob.glob(os.path.join(debs, "dict-foldoc_*.deb")))[-1]
    subprocess.run(["dpkg-deb", "-x", deb, raw_dir], check=True)


def foldoc_pairs(raw_dir: str):
    path = os.path.join(raw_dir, FOLDOC)
    text = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
    # an entry: headword line(s) at column 0 (the first is the name, the rest aliases), then an indented body
    for block in re.split(r"\n(?=\S)(?<!\S\n)", text):
        lines = block.split("\n")
        head = lines[0].strip()
        body = [ln.strip() for ln in lines[1:] if ln[:1].isspace() or not ln]
        paras = " ".join(body).strip()
        if not head or not paras or head.startswith("00-database") or len(head) > 40:
            continue
        first = "\n".join(body).strip().split("\n\n")[0]
        answer = first_sentences(clean_foldoc(first))
        if answer and "see" != answer.lower()[:3]:
            yield "foldoc", f"What is {head}?", answer


def clean_foldoc(text: str) -> str:
    text = squash(text)
    text = re.sub(r"^(<[^>]*>\s*)+", "", text)  # leading <domain> tags
    text = re.sub(r"^(\([^)]*\)\s*)?(/[^/ ][^/]*/,?\s*(\*not\*\s*/[^/]*/)?\s*)+", "", text)  # pronunciation
    text = re.sub(r"<[^>]*>", "", text)
    text = re.sub(r"\{([^}|]*)(\|[^}]*)?\}", r"\1", text)  # {cross reference}
    text = re.sub(r"^\d+\.\s*", "", text)  # numbered senses: keep the first
    text = re.sub(r"^\([^)]*\)\s*", "", text)  # the leading (ABBREVIATION)
    return squash(text)


def debian_pairs():
    long_desc = dpkg_status_descriptions()
    out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    seen = set()
    for stanza in out.split("\n\n"):
        m_pkg = re.search(r"^Package: (\S+)$", stanza, re.M)
        m_desc = re.search(r"^Description: (.+)$", stanza, re.M)
        if not m_pkg or not m_desc or m_pkg.group(1) in seen:
            continue
        pkg = m_pkg.group(1)
        seen.add(pkg)
        if re.search(r"-(dbg|dbgsym|dev|doc|data|common|l10n|locale|\d+)$", pkg) or pkg.startswith("lib"):
            continue  # library plumbing, translations and debug symbols: not what users ask about
        short = m_desc.group(1).strip()
        answer = short[0].upper() + short[1:] + ("" if short.endswith(".") else ".")
        extra = first_sentences(long_desc.get(pkg, ""), max_sentences=1, max_chars=200)
        if extra:
            answer = f"{answer} {extra}"
        yield "debian", f"What is the Debian package {pkg} for?", answer


def dpkg_status_descriptions() -> dict[str, str]:
    """{package: first paragraph of its long description} for installed packages."""
    out = {}
    text = open("/var/lib/dpkg/status", encoding="utf-8", errors="replace").read()
    for stanza in text.split("\n\n"):
        m_pkg = re.search(r"^Package: (\S+)$", stanza, re.M)
        m_desc = re.search(r"^Description: .*\n((?: .*\n?)*)", stanza, re.M)
        if m_pkg and m_desc:
            para = m_desc.group(1).split("\n .\n")[0]
            out[m_pkg.group(1)] = squash(para)
    return out


def man_pairs(man_root: str = "/usr/share/man"):
    for path in sorted(glob.glob(os.path.join(man_root, "man[18]", "*.gz"))):
        name = os.path.basename(path)[:-3].rsplit(".", 1)[0]
        try:
            src = gzip.open(path, "rt", encoding="utf-8", errors="replace").read(200_000)
        except (OSError, EOFError):
            continue
        if src.startswith(".so "):
            continue  # an alias page
        summary = man_name_line(src, name)
        if not summary:
            continue
        answer = man_sentence(name, summary)
        desc = man_description(src)
        if desc:
            answer = f"{answer} {desc}"
        yield "man", f"What does the {name} command do?", answer


def roff_text(line: str) -> str:
    line = re.sub(r"\\f(\[[^]]*\]|\(..|.)", "", line)
    line = line.replace("\\-", "-").replace("\\(em", "-").replace("\\(en", "-").replace("\\&", "")
    line = line.replace("\\e", "\\").replace("\\ ", " ").replace("\\(aq", "'").replace("\\(dq", '"')
    return re.sub(r"\\[(*][^ ]*", "", line)


def man_name_line(src: str, name: str) -> str:
    m = re.search(r"^\.S[Hh] \"?NAME\"?\s*\n((?:.*\n){1,4}?)\.(?:SH|Sh|SS)", src, re.M)
    if not m:
        return ""
    text = " ".join(
        roff_text(re.sub(r"^\.(?:Nm|Nd|B|BR|I)\s*", "", ln))
        for ln in m.group(1).splitlines()
        if not ln.startswith('.\\"') and not ln.startswith(".PP")
    )
    parts = re.split(r"\s+-+\s+|\s+-\s*", squash(text), maxsplit=1)
    if len(parts) != 2 or name not in parts[0]:
        return ""
    summary = parts[1].strip().rstrip(".")
    return summary if 8 <= len(summary) <= 160 and "\\" not in summary else ""


def man_sentence(name: str, summary: str) -> str:
    first = summary.split()[0].rstrip(",")
    if len(first) > 1 and first.isupper():  # an acronym starts a noun phrase
        return f"{name} is the {summary}."
    summary = summary[0].lower() + summary[1:]
    if first.lower() in ("a", "an", "the"):
        return f"{name} is {summary}."
    return f"{name} is used to {summary}."


def man_description(src: str) -> str:
    m = re.search(r"^\.S[Hh] \"?DESCRIPTION\"?\s*\n((?:.*\n){1,30})", src, re.M)
    if not m:
        return ""
    words = []
    for ln in m.group(1).splitlines():
        if ln.startswith((".SH", ".Sh", ".SS", ".TP", ".IP", ".Bl", ".nf", ".EX")) and words:
            break
        if ln.startswith((".PP", ".P", ".LP", ".Pp")) and words:
            break
        if ln.startswith('.\\"') or (ln.startswith(".") and not re.match(r"\.(B|I|BR|IR|RB|RI|Nm|Ar|Cm)\b", ln)):
            continue
        words.append(roff_text(re.sub(r"^\.\w+\s*", "", ln)).replace('"', ""))
    sent = first_sentences(" ".join(words), max_sentences=1, max_chars=200)
    return sent if sent and "\\" not in sent and not sent.startswith("-") else ""


# ----------------------------------------------------------------------------------------------


def build(raw_dir: str, cap: int, heldout_per_source: int, seed: int):
    pools: dict[str, dict[str, tuple[str, str, str]]] = {}
    sources = [stdlib_pairs(sysconfig.get_paths()["stdlib"]), foldoc_pairs(raw_dir), debian_pairs(), man_pairs()]
    for gen in sources:
        for source, q, a in gen:
            pools.setdefault(source, {}).setdefault(q, (source, q, a))  # first answer per question wins
    train, held = [], []
    for source in sorted(pools):
        items = sorted(pools[source].values(), key=lambda p: stable_hash(f"{seed}:{p[1]}"))[:cap]
        held += items[:heldout_per_source]
        train += items[heldout_per_source:]
        print(
            f"{source}: {len(pools[source])} pairs, kept {len(items)} ({heldout_per_source} held out)", file=sys.stderr
        )
    return train, held


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw-dir", default="build/demo_corpus/raw", help="extracted .debs (dict-foldoc)")
    ap.add_argument("--fetch", action="store_true", help="apt-get download + dpkg-deb -x dict-foldoc if missing")
    ap.add_argument("--out", default="build/demo_qa")
    ap.add_argument("--cap", type=int, default=9000, help="pairs kept per source")
    ap.add_argument("--heldout", type=int, default=60, help="held-out pairs per source")
    ap.add_argument("--seed", type=int, default=19)
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(args.raw_dir, FOLDOC)):
        if not args.fetch:
            sys.exit(f"{os.path.join(args.raw_dir, FOLDOC)}: missing; rerun with --fetch (needs apt)")
        fetch_foldoc(args.raw_dir)
    train, held = build(args.raw_dir, args.cap, args.heldout, args.seed)
    os.makedirs(args.out, exist_ok=True)
    for name, rows in (("train", train), ("heldout", held)):
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path + ".tmp", "w") as f:
            for source, q, a in rows:
                f.write(json.dumps({"source": source, "question": q, "answer": a}) + "\n")
        os.replace(path + ".tmp", path)
    print(f"{len(train)} train, {len(held)} held-out pairs in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
