"""Command-line options several `igpt-fast` verbs share, defined once; torch-free, so importing the CLI
stays instant.

The enumerations the library accepts are defined here, once, so that a flag's click.Choice and the
library's own check take the same tuple: IMPLS (the impl= of igpt_fast.model.IGPT and of the kernels'
dispatch) and RESIZE_MODES (igpt_fast.images.resize_image, tokenize).

--impl, --resize, --workers, --device, --overwrite, and the parameter types: a finite float for every
numeric flag (`--lr nan` or `--lr inf` is a usage error, not a run that diverges at its first step),
a comma-separated list of them, a torch device checked against what the machine has, and an output
path (`OUTPUT_DIR`, `OUTPUT_FILE`, `OutputPath`) checked before any work: a parent that is a file, a
read-only place or a folder without write permission is a one-line usage error of the verb, not a
traceback after minutes of work.

Renamed spellings (`train DATA_DIR` -> `--data DATA_DIR` via `data_options`, `--num-workers` ->
`--workers`, sample's `--images` flag, now implied: `images_flag`) are kept for one release as hidden parameters (`renamed_option`, `renamed_argument`) of a `Verb`: the old
spelling still works, prints one `note:` line on stderr naming the new one, and its value lands in
the new parameter, given on the command line as far as the verb can tell; both spellings at once
are a usage error.
"""
import math
import os
from typing import Iterable

import click
from click.core import ParameterSource

from igpt_fast.atomic import output_error

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
loader_workers_option = click.option("--workers", type=click.IntRange(0), default=0, show_default=True,
                                     help="DataLoader worker processes per training process (0 = read in the "
                                          "training process).")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Start a new run in a folder that already holds one (its checkpoints and log go).")
tensorboard_option = click.option(
    "--tensorboard", is_flag=True,
    help="Also write log.jsonl's scalars as TensorBoard events into OUT/tb/ (needs the tensorboard package).")


def explicit_params(ctx: click.Context, names: Iterable[str]) -> set[str]:
    """The parameters among names that the user gave on the command line or in train's --config file (not
    defaults)."""
    return {n for n in names if ctx.get_parameter_source(n) in (ParameterSource.COMMANDLINE,
                                                                 ParameterSource.ENVIRONMENT,
                                                                 ParameterSource.DEFAULT_MAP)}


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


class FloatList(click.ParamType):
    """Comma-separated finite floats >= 0, e.g. `1e-3,1e-2` -> [0.001, 0.01]."""

    name = "floats"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            values = [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r}: expected comma-separated numbers such as 1e-3,1e-2", param, ctx)
        if not values or not all(math.isfinite(v) and v >= 0 for v in values):
            self.fail(f"{value!r}: give one or more finite numbers >= 0", param, ctx)
        return values


class Device(click.ParamType):
    """A torch device (cuda, cuda:1, cpu); missing: cuda when present, else cpu. torch is imported
    only when the value is converted, after --help had its chance."""

    name = "device"

    def convert(self, value, param, ctx):
        import torch

        if value is None or value == "":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(value, torch.device):
            return value
        try:
            dev = torch.device(value)
        except RuntimeError as e:
            self.fail(f"{value}: {e}", param, ctx)
        if dev.type == "cuda" and not torch.cuda.is_available():
            self.fail(f"{value}: CUDA is not available here; use --device cpu", param, ctx)
        return dev


device_option = click.option("--device", type=Device(), default="", show_default=False,
                             help="cuda, cuda:1, cpu (default: cuda when present).")
train_device_option = click.option(
    "--device", type=Device(), default=None,
    help="cpu, cuda or cuda:1 (default: each process's own: cuda:LOCAL_RANK when present, else cpu). Under torchrun "
         "and with --parallel fsdp only the default kind of device runs.")


def note(text):
    """One `note:` line on stderr, from the main process only (RANK unset or 0: torchrun starts every rank)."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"note: {text}", err=True)


_RENAMED = "igpt_fast.renamed"


def _renamed(dest, old, new):
    """The callback of a parameter kept under its old spelling: a note, and the value set aside for Verb."""

    def callback(ctx, param, value):
        if value is None or ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            return
        note(f"{old} is deprecated and goes in the next release; use {new}")
        ctx.meta.setdefault(_RENAMED, {})[dest] = (old, new, value)

    return callback


def renamed_option(old, dest, new, **kwargs):
    """A hidden option spelled `old` whose value goes to the parameter `dest` (spelled `new` now)."""
    return click.option(old, f"{dest}_renamed", hidden=True, expose_value=False,
                        callback=_renamed(dest, old, new), **kwargs)


class _HiddenArgument(click.Argument):
    """A positional argument left out of the usage line (a spelling kept for one release)."""

    def get_usage_pieces(self, ctx):
        return []


def renamed_argument(metavar, dest, old, new, **kwargs):
    """An optional, hidden positional argument whose value goes to the parameter `dest` (an option now)."""
    return click.argument(f"{dest}_renamed", metavar=metavar, cls=_HiddenArgument, required=False,
                          expose_value=False, callback=_renamed(dest, old, new), **kwargs)


def data_options(verb, help):
    """--data DIR, and for one release the positional DATA_DIR it replaces (hidden, with a note)."""
    path = click.Path(exists=True, file_okay=False)

    def decorate(f):
        f = click.option("--data", "data_dir", type=path, help=help + "  [required]")(f)
        return renamed_argument("DATA_DIR", "data_dir", f"`igpt-fast {verb} DATA_DIR`",
                                f"`igpt-fast {verb} --data DATA_DIR`", type=path)(f)

    return decorate


def need_data(data_dir: str | None, verb: str) -> None:
    """--data is required (it is not click-required only because the old positional form may give it)."""
    if data_dir is None:
        raise click.UsageError(f"Missing option '--data': the token shards (from `igpt-fast tokenize`), e.g. "
                               f"igpt-fast {verb} --data data/ ...")


def images_flag(ctx, param, value):
    """sample's --images flag of the previous release: image files after RUN are completed without it."""
    if value:
        note("--images is not needed and goes in the next release: image files after RUN are completed "
             "(igpt-fast sample RUN a.png b.png)")
    return value


class Verb(click.Command):
    """A command whose renamed parameters (renamed_option, renamed_argument) land in their new parameter."""

    def parse_args(self, ctx, args):
        rest = super().parse_args(ctx, args)
        for dest, (old, new, value) in ctx.meta.pop(_RENAMED, {}).items():
            if ctx.get_parameter_source(dest) is ParameterSource.COMMANDLINE:
                raise click.UsageError(f"{old} and {new} are the same setting; give {new} only", ctx)
            ctx.params[dest] = value
            ctx.set_parameter_source(dest, ParameterSource.COMMANDLINE)
        return rest


def output_problem(path):
    """Why `path` cannot be written as an output (file or folder, made if missing), or None: its nearest
    existing ancestor (itself when it exists) must be a folder that a file can be created in. The check
    creates and removes a temp-named file there (`.write-check.tmp.PID.0`, skipped by folder scans)."""
    place = os.path.abspath(path)
    if os.path.exists(place) and not os.path.isdir(place):
        place = os.path.dirname(place)  # an existing file is replaced: its folder is what is written
    while not os.path.exists(place):
        place = os.path.dirname(place)
    if not os.path.isdir(place):
        return f"{place} is not a folder"
    probe = os.path.join(place, f".write-check.tmp.{os.getpid()}.0")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return None  # another check of this process is under way there: the folder is writable
    except OSError as e:
        err = output_error(e, place)
        return str(err) if err else f"cannot write {place}: {e.strerror}"
    os.remove(probe)
    return None


class OutputPath(click.Path):
    """click.Path for what a verb writes: a file or folder that need not exist yet, in a place that can be
    written (output_problem); file_okay / dir_okay as click.Path's."""

    def __init__(self, file_okay=True, dir_okay=True):
        super().__init__(file_okay=file_okay, dir_okay=dir_okay)

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        problem = output_problem(path)
        if problem:
            self.fail(f"{path}: {problem}", param, ctx)
        return path


OUTPUT_DIR = OutputPath(file_okay=False)
OUTPUT_FILE = OutputPath(dir_okay=False)
