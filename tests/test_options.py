"""The CLI offers what the library accepts: every verb's `--impl` and `--resize` choices are the values
IGPT, the kernels' dispatch and resize_image take, and the library refuses any other value."""
import numpy as np
import pytest
import torch
from PIL import Image

from igpt_fast.cli import cli
from igpt_fast.images import resize_image
from igpt_fast.kernels import softmax
from igpt_fast.model import GPTConfig, IGPT
from igpt_fast.readers import TokenizeError


def choices(option):
    """{verb: the click.Choice values of its option `option`} over every verb of the CLI."""
    return {verb: tuple(p.type.choices) for verb, command in cli.commands.items()
            for p in command.params if p.name == option}


def test_every_impl_choice_is_an_impl_the_library_takes():
    found = choices("impl")
    assert {"train", "probe", "finetune", "sample"} <= set(found)
    assert len(set(found.values())) == 1  # one list for every verb
    impls = next(iter(found.values()))
    cfg = GPTConfig(n_px=2, n_vocab=4, n_layer=1, n_head=1, n_embd=8)
    x = torch.randn(2, 8, device="cuda" if torch.cuda.is_available() else "cpu")  # Triton: interpreter on CPU
    for impl in impls:
        assert IGPT(cfg, impl=impl).impl == impl
        torch.testing.assert_close(softmax(x, impl=impl), torch.softmax(x, -1))
    for other in ("cuda", "TRITON", ""):
        with pytest.raises(ValueError, match="impl"):
            IGPT(cfg, impl=other)
        with pytest.raises(ValueError, match="impl"):
            softmax(x, impl=other)


def test_every_resize_choice_is_a_mode_resize_image_takes():
    found = choices("resize")
    assert {"palette", "tokenize", "sample"} <= set(found)
    assert len(set(found.values())) == 1
    image = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3))
    for mode in next(iter(found.values())):
        assert resize_image(image, 4, mode).shape == (4, 4, 3)
    with pytest.raises(TokenizeError, match="unknown resize mode"):
        resize_image(image, 4, "crop")
