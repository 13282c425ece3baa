"""The `igpt-fast` command line: one click group, one verb per stage.

Heavy imports (torch, faiss, webdataset) happen inside each command so `igpt-fast --help` is instant.
Progress bars go to stderr; stdout carries results.
"""
import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="igpt-fast")
def cli():
    """Image GPT: palette -> tokenize -> train -> probe / finetune / sample."""


def main():
    cli()


if __name__ == "__main__":
    main()
