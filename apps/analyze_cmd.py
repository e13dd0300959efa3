"""moelite analyze: routing-consistency analysis and calibration. The command itself lives with the cache
policies (`moelite.cache_policies.calibrate.analyze_main(argv) -> int`); this is the hook that finds it."""
from __future__ import annotations

import argparse
import importlib

from ..errors import MoeliteError

NAME = "analyze"
HELP = "measure routing consistency (SRP/SCH) and calibrate the expert cache"
HOOKS = ("moelite.cache_policies.calibrate", "moelite.cache_policies.calibration")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("argv", nargs=argparse.REMAINDER, help="arguments of the analysis (see its own --help)")


def find() -> object | None:
    for name in HOOKS:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        fn = getattr(mod, "analyze_main", None)
        if callable(fn):
            return fn
    return None


def main(args: argparse.Namespace) -> int:
    fn = find()
    if fn is None:
        raise MoeliteError("'moelite analyze' is not available yet in this build "
                           "(moelite.cache_policies.calibrate has no analyze_main)")
    return int(fn(list(args.argv)) or 0)
