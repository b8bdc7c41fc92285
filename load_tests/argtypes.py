"""argparse ``type=`` converters shared by the CLI's common options (:mod:`load_tests.cli`) and the
scenario options each scenario adds itself (:mod:`load_tests.scenarios`); a module of their own so
that neither of those two has to import the other."""
from __future__ import annotations

import argparse


def opt_float(text: str) -> float | None:
    """A number, or ``none``/``off``/``0`` to disable an SLO bound."""
    if text.lower() in ("none", "off", "0", "-1"):
        return None
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0 (or 'none')")
    return v


def pos_float(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def pos_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v
