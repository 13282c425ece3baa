"""train's `--config RUN/config.json`: a run's recorded configuration read back as the defaults of train's
parameters, so `igpt-fast train --config RUN/config.json --out RUN2` repeats a run and flags given on the
command line override it.

Its own module because it is one concept of its own, the reverse of train.record (which writes
config.json), and the only part of the CLI that reads a file of settings; cli.py keeps the verbs.
Torch-free at import (GPTConfig and TrainConfig are imported when a --config is read), so `igpt-fast --help`
stays instant.

What is taken (see the _CONFIG_* tuples): the model's flags, every TrainConfig field, the RunOptions of
how it ran. Not taken: n_px and n_vocab (the data's), device (this machine's), results (params, ...).
`config_option` is train's --config. JSON always; YAML (.yaml / .yml, the same keys) when PyYAML is installed.
"""
from typing import Any

import click

_CONFIG_MODEL = ("n_layer", "n_head", "n_embd", "objective", "dropout")
_CONFIG_OPTIONS = ("impl", "grad_checkpoint", "compile", "parallel", "tensorboard")
_CONFIG_RENAMED = {"out_dir": "out", "num_workers": "workers"}


def read_config(path: str) -> dict[str, Any]:
    """A config file as a dict: JSON, or YAML (.yaml / .yml) when PyYAML is installed."""
    import json

    with open(path) as f:
        text = f.read()
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise click.ClickException(f"--config {path}: reading YAML needs the PyYAML package (pip install pyyaml); "
                                       "or pass the run's config.json") from None
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise click.ClickException(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    else:
        try:
            cfg = json.loads(text)
        except ValueError as e:
            raise click.ClickException(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or not isinstance(cfg.get("train"), dict):
        raise click.ClickException(f"--config {path}: not a run's config (no 'model' and 'train' sections); pass the "
                                   "config.json that `igpt-fast train` wrote into its run folder")
    return cfg


def config_defaults(path: str) -> dict[str, Any]:
    """The defaults of train's parameters that the run config at `path` sets (see _CONFIG_*)."""
    from dataclasses import fields

    from .model import GPTConfig
    from .train import TrainConfig

    cfg = read_config(path)
    defaults = {}
    fixed = {f.name: f.default for f in fields(GPTConfig) if f.name not in _CONFIG_MODEL}
    for key, value in cfg["model"].items():
        if key in _CONFIG_MODEL:
            defaults[key] = value
        elif key not in fixed:
            raise click.ClickException(f"--config {path}: unknown model setting {key!r}")
        elif key not in ("n_px", "n_vocab") and value != fixed[key]:
            raise click.ClickException(f"--config {path}: model {key} {value!r} cannot be set on the command line "
                                       f"(train uses {fixed[key]!r}); build that model with the library")
    names = {f.name for f in fields(TrainConfig)}
    for key, value in cfg["train"].items():
        if key not in names:
            raise click.ClickException(f"--config {path}: unknown train setting {key!r}")
        defaults[_CONFIG_RENAMED.get(key, key)] = value
    defaults.update({key: cfg[key] for key in _CONFIG_OPTIONS if key in cfg})
    if cfg.get("parallel") == "fsdp" and cfg.get("mixed_precision") is not None:
        defaults["mixed_precision"] = cfg["mixed_precision"]
    return defaults


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--config's callback (an eager option): the run config's settings become the defaults of the other
    parameters, so flags given on the command line override them."""
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **config_defaults(value)}


config_option = click.option(
    "--config", "config_path", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
    callback=_load_config,
    help="A run's RUN/config.json (or YAML of the same keys) to repeat: its data, out, model and training settings "
         "become the defaults; flags given on the command line override them. --device, --resume and --overwrite "
         "are never read from it.")
