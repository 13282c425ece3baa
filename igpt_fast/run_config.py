"""`--config FILE` of train and finetune: a run's recorded configuration read back as the defaults of the
verb's parameters, so `igpt-fast train --config RUN/config.json --out RUN2` repeats a pretraining run,
`igpt-fast finetune --config OUT/config.json --out OUT2` a finetuning run, and flags given on the command
line override the file.

Its own module because it is one concept of its own, the reverse of train.record (which writes config.json;
finetune adds its 'finetune' section) and the only part of the CLI that reads a file of settings; cli.py
keeps the verbs. Torch-free at import (the dataclasses are imported when a --config is read), so
`igpt-fast --help` stays instant.

What train takes: the model's flags (_CONFIG_MODEL), every TrainConfig field, the RunOptions of how it ran.
What finetune takes: the 'finetune' section (RUN as `run`, the FinetuneConfig fields), the TrainConfig fields
it has flags for, --impl and --tensorboard; the model is the pretrained run's, so the 'model' section is
only checked for unknown keys, and a setting finetune has no flag for must hold finetune's own value.
Neither takes n_px and n_vocab (the data's), device (this machine's) or results (params, ...). A key that is
no setting or record is an error, and every value is checked against its flag's type and range before click
sees it: one line naming the file and the key or flag.
JSON always; YAML (.yaml / .yml, the same keys) when PyYAML is installed.
"""
import json
from typing import Any, Callable

import click

from .options import FiniteFloat

_CONFIG_MODEL = ("n_layer", "n_head", "n_embd", "objective", "dropout")
_CONFIG_OPTIONS = ("impl", "grad_checkpoint", "compile", "parallel", "tensorboard")
_CONFIG_RENAMED = {"out_dir": "out", "num_workers": "workers", "run": "run_dir"}
_RECORDED = ("world_size", "device", "params", "flops_per_token", "resumed_from", "start_step", "changed_on_resume",
             "palette_sha256")  # what train.record writes besides the settings: never read


def read_config(path: str, verb: str = "train") -> dict[str, Any]:
    """A config file of `verb` (train or finetune) as a dict: JSON, or YAML (.yaml / .yml) when PyYAML is
    installed. A train config has 'model' and 'train' sections, a finetune config a 'finetune' section."""
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
    sections = ("model", "train") if verb == "train" else ("finetune",)
    if isinstance(cfg, dict) and verb == "train" and "finetune" in cfg:
        raise click.ClickException(f"--config {path}: a finetune run's config (it has a 'finetune' section); pass "
                                   "it to `igpt-fast finetune --config`")
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(s), dict) for s in sections):
        if verb == "train":
            raise click.ClickException(f"--config {path}: not a run's config (no 'model' and 'train' sections); pass "
                                       "the config.json that `igpt-fast train` wrote into its run folder")
        raise click.ClickException(f"--config {path}: not a finetune run's config (no 'finetune' section); pass the "
                                   "config.json that `igpt-fast finetune` wrote into its output folder (a train "
                                   "run's config.json goes to `igpt-fast train --config`)")
    for section in ("model", "train"):
        if not isinstance(cfg.get(section, {}), dict):
            raise click.ClickException(f"--config {path}: '{section}' is not a section of settings")
    return cfg


def _check_known(path: str, where: str, keys, known) -> None:
    """One line naming the first key of `keys` that is not in `known`."""
    unknown = [key for key in keys if key not in known]
    if unknown:
        raise click.ClickException(f"--config {path}: unknown {where}setting {unknown[0]!r}")


def _take(path: str, where: str, values: dict, taken, fixed: dict, verb: str, fix: str) -> dict[str, Any]:
    """The defaults that `values` (one section) sets: a key's value under its parameter's name when that name
    is in `taken`; any other key must be one of `fixed` and hold its value there (what `verb` uses)."""
    _check_known(path, where, values, fixed)
    defaults = {}
    for key, value in values.items():
        name = _CONFIG_RENAMED.get(key, key)
        if name in taken:
            defaults[name] = value
        elif value != fixed[key]:
            raise click.ClickException(f"--config {path}: {where}{key} {json.dumps(value)} cannot be set on the "
                                       f"command line ({verb} uses {json.dumps(fixed[key])}); {fix}")
    return defaults


def _options(path: str, cfg: dict) -> dict[str, Any]:
    """The RunOptions a config records (device left out: this machine's); any other top-level key must be a
    section or what train.record writes besides the settings."""
    from dataclasses import fields

    from .train import RunOptions

    names = [f.name for f in fields(RunOptions)]
    _check_known(path, "", cfg, ("model", "train", "finetune", *names, *_RECORDED))
    return {key: cfg[key] for key in names if key in cfg and key != "device"}


def config_defaults(path: str, params: set[str]) -> dict[str, Any]:
    """The defaults of train's parameters (named `params`) that the run config at `path` sets."""
    from dataclasses import fields

    from .model import GPTConfig
    from .train import TrainConfig

    cfg = read_config(path, "train")
    options = _options(path, cfg)
    model = {key: value for key, value in cfg["model"].items() if key not in ("n_px", "n_vocab")}  # the data's
    defaults = _take(path, "model ", model, _CONFIG_MODEL, {f.name: f.default for f in fields(GPTConfig)}, "train",
                     "build that model with the library")
    defaults.update(_take(path, "train ", cfg["train"], params, {f.name: f.default for f in fields(TrainConfig)},
                          "train", "train with the library"))
    defaults.update({key: options[key] for key in _CONFIG_OPTIONS if key in options})
    if options.get("parallel") == "fsdp" and options.get("mixed_precision") is not None:
        defaults["mixed_precision"] = options["mixed_precision"]
    return defaults


def finetune_defaults(path: str, params: set[str]) -> dict[str, Any]:
    """The defaults of finetune's parameters (named `params`) that the finetune config at `path` sets."""
    from dataclasses import asdict, fields

    from .finetune import FinetuneConfig, finetune_config
    from .model import GPTConfig
    from .train import RunOptions

    cfg = read_config(path, "finetune")
    options = _options(path, cfg)
    _check_known(path, "model ", cfg.get("model", {}), {f.name for f in fields(GPTConfig)})  # the pretrained run's
    fix = "finetune with the library (igpt_fast.finetune)"
    defaults = _take(path, "finetune ", cfg["finetune"], params, {"run": None, **asdict(FinetuneConfig())},
                     "finetune", fix)
    train = cfg.get("train", {})
    fixed = asdict(finetune_config(None, eval_every=train.get("eval_every", 100)))  # ckpt_every follows eval_every
    defaults.update(_take(path, "train ", train, params, fixed, "finetune", fix))
    defaults.update(_take(path, "", options, params, asdict(RunOptions(mixed_precision=False)), "finetune", fix))
    return defaults


def _check_type(ctx: click.Context, path: str, param: click.Parameter, value: Any) -> None:
    """A config value fit for its parameter, or one line naming the file and the flag. The JSON / YAML type
    first (click would take 2.5 for 2 and true for 1, and fail with a traceback on a list), then the
    parameter's own checks (ranges, choices); a path is checked when it is used, as a flag may replace it."""
    kind, types = param.type, (str,)  # type: click.ParamType, tuple[type, ...]
    if isinstance(kind, click.types.BoolParamType):
        want, types = "true or false", (bool,)
    elif isinstance(kind, click.types.IntParamType):
        want, types = "an integer", (int,)
    elif isinstance(kind, (click.types.FloatParamType, FiniteFloat)):
        want, types = "a number", (int, float, str)  # YAML reads 1e-3 as a string
    else:
        want = "a string"  # choices and paths
    flag = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
    if value is None:  # null: for a parameter without a default value of its own (None, or click's unset)
        ok = not isinstance(param.get_default(ctx, call=False), (bool, int, float, str))
    else:
        ok = isinstance(value, types) and isinstance(value, bool) == (types == (bool,))
    if not ok:
        raise click.ClickException(f"--config {path}: {flag} {json.dumps(value)} is not {want}")
    if not isinstance(kind, click.Path):
        try:
            param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise click.ClickException(f"--config {path}: {flag} {json.dumps(value)}: {e.message}") from None


def _loader(defaults: Callable[[str, set[str]], dict[str, Any]]):
    """The callback of --config (an eager option): the config's settings, each checked, become the defaults
    of the command's other parameters, so flags given on the command line override them."""

    def load(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is None:
            return
        params = {p.name: p for p in ctx.command.params if p.name is not None}
        found = defaults(value, set(params))
        for name, setting in found.items():
            _check_type(ctx, value, params[name], setting)
        ctx.default_map = {**(ctx.default_map or {}), **found}

    return load


def _config_option(defaults, text):
    """A verb's --config option, read by `defaults` (config_defaults, finetune_defaults)."""
    return click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), is_eager=True,
                        expose_value=False, callback=_loader(defaults), help=text)


config_option = _config_option(config_defaults, (
    "A run's RUN/config.json (or YAML of the same keys) to repeat: its data, out, model and training settings "
    "become the defaults; flags given on the command line override them. --device, --resume and --overwrite "
    "are never read from it."))
finetune_config_option = _config_option(finetune_defaults, (
    "A finetune run's OUT/config.json (or YAML of the same keys) to repeat: its RUN, data, out and finetuning "
    "settings become the defaults; flags given on the command line override them. --device, --resume and "
    "--overwrite are never read from it."))
