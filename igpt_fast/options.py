"""Command-line options several `igpt-fast` verbs share, defined once; torch-free, so importing the CLI
stays instant.

--impl, --resize, --workers, --device, --overwrite, and the finite-float type every numeric flag uses
(`--lr nan` or `--lr inf` is a usage error, not a run that diverges at its first step).
"""
import math
import os

import click

IMPLS = ("auto", "triton", "torch")
RESIZE_MODES = ("squash", "center-crop", "pad")
DEFAULT_WORKERS = max(1, min(8, os.cpu_count() or 1))

impl_option = click.option(
    "--impl", type=click.Choice(IMPLS), default="auto", show_default=True,
    help="Kernels: auto (Triton on CUDA, torch elsewhere), triton, torch. Chosen per run, never saved.")
resize_option = click.option(
    "--resize", type=click.Choice(RESIZE_MODES), default="squash", show_default=True,
    help="squash = HF ImageGPT's bilinear resize; center-crop; pad (e.g. 28 -> 32, black border).")
workers_option = click.option("--workers", type=click.IntRange(1), default=DEFAULT_WORKERS, show_default=True,
                              help="Decode/resize processes.")
device_option = click.option("--device", help="cuda, cuda:1, cpu (default: cuda when present).")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Start a new run in a folder that already holds one (its checkpoints and log go).")


class FiniteFloat(click.ParamType):
    """A finite float (no nan / inf) in [lo, hi]; lo_open excludes lo."""

    name = "float"

    def __init__(self, lo=None, hi=None, lo_open=False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            self.fail(f"{v} must be {'>' if self.lo_open else '>='} {self.lo}", param, ctx)
        if self.hi is not None and v > self.hi:
            self.fail(f"{v} must be <= {self.hi}", param, ctx)
        return v


POSITIVE = FiniteFloat(0, lo_open=True)
NON_NEGATIVE = FiniteFloat(0)
