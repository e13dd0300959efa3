"""moelite cache [list | remove NAME... | remove --all]: the converted models (and the machine measurement) that
moelite keeps in ~/.cache/moelite ($XDG_CACHE_HOME/moelite)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import UsageError
from ..runtime.files import cache_dir

NAME = "cache"
HELP = "list or remove the converted models kept in ~/.cache/moelite"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=("list", "remove"), default="list", help="list (default) or remove")
    p.add_argument("names", nargs="*", metavar="NAME", help="with remove: file names as 'list' shows them")
    p.add_argument("--all", action="store_true", help="with remove: every cached file")


def entries() -> list[Path]:
    root = cache_dir()
    files = sorted((root / "converted").glob("*.gguf")) if (root / "converted").is_dir() else []
    return files + [f for f in (root / "machine.json",) if f.is_file()]


def main(args: argparse.Namespace) -> int:
    from ..runtime.planner import fmt_bytes

    files = entries()
    if args.action == "list":
        if args.names or args.all:
            raise UsageError("'cache list' takes no names and no --all")
        print(f"{cache_dir()}: {len(files)} file(s), {fmt_bytes(sum(f.stat().st_size for f in files))}")
        for f in files:
            st = f.stat()
            print(
                f"  {f.name}  {fmt_bytes(st.st_size)}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(st.st_mtime))}"
            )
        return 0
    if args.all == bool(args.names):
        raise UsageError("cache remove: give the NAMEs to remove ('moelite cache list' shows them) or --all")
    by_name = {f.name: f for f in files}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        raise UsageError(f"cache remove: no cached file {unknown[0]!r} in {cache_dir()} (see 'moelite cache list')")
    doomed = files if args.all else [by_name[n] for n in args.names]
    freed = sum(f.stat().st_size for f in doomed)
    for f in doomed:
        f.unlink()
    print(f"removed {len(doomed)} file(s), {fmt_bytes(freed)}")
    return 0
