"""`igpt-fast bench`: the kernel microbenchmarks of the source checkout, run from the command line.

Kept out of cli.py because these verbs only pass their arguments through to the scripts in
benchmarks/ (which need a source checkout, not the installed library); cli.py adds the group.
"""
import os

import click


@click.group("bench")
def bench():
    """Kernel microbenchmarks: CSV, markdown and a plot in benchmarks/results/ (needs a source checkout).

    Each verb runs the script benchmarks/bench_<op>.py of the checkout this package was installed from
    (`pip install -e .`) and passes every option through: `igpt-fast bench attention --help` lists them,
    `--smoke` runs tiny shapes on CPU."""


_PASSTHROUGH = dict(ignore_unknown_options=True, allow_extra_args=True)


def _run_bench_script(script, args):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(repo, "benchmarks", script)
    if not os.path.exists(path):
        raise click.ClickException(f"{path} not found: the benchmarks live in the source tree; clone igpt-fast, "
                                   "`pip install -e .` there and run `igpt-fast bench ...` again")
    returncode = subprocess.run([sys.executable, path, *args]).returncode
    if returncode:
        sys.exit(returncode)


@bench.command("attention", context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_attention_cmd(args):
    """Flash attention vs SDPA backends vs naive: ms, TFLOP/s, memory (see --help)."""
    _run_bench_script("bench_attention.py", args)


@bench.command("softmax", context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_softmax_cmd(args):
    """Row softmax vs torch.softmax: GB/s vs the copy bandwidth (see --help)."""
    _run_bench_script("bench_softmax.py", args)


@bench.command("cross-entropy", context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_cross_entropy_cmd(args):
    """Fused cross-entropy vs F.cross_entropy: GB/s, memory (see --help)."""
    _run_bench_script("bench_cross_entropy.py", args)
