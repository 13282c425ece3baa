"""The CLI offers what the library accepts: every verb's `--impl` and `--resize` choices are the values
IGPT, the kernels' dispatch (attention, softmax, cross_entropy) and resize_image take, and the library
refuses any other value."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from igpt_fast.cli import cli
from igpt_fast.images import resize_image
from igpt_fast.kernels import attention, cross_entropy, softmax
from igpt_fast.model import GPTConfig, IGPT
from igpt_fast.options import IMPLS
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
    assert impls == IMPLS
    cfg = GPTConfig(n_px=2, n_vocab=4, n_layer=1, n_head=1, n_embd=8)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: the interpreter on CPU
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, generator=gen).to(device)
    q, k, v = (torch.randn(1, 2, 5, 32, generator=gen).to(device) for _ in range(3))  # (B, nh, T, hd), T ragged
    logits, targets = torch.randn(6, 16, generator=gen).to(device), torch.tensor([0, 3, 15, -100, 7, 1]).to(device)
    ops = {"softmax": (lambda impl: softmax(x, impl=impl), torch.softmax(x, -1)),
           "attention": (lambda impl: attention(q, k, v, causal=True, impl=impl),
                         F.scaled_dot_product_attention(q, k, v, is_causal=True)),
           "cross_entropy": (lambda impl: cross_entropy(logits, targets, impl=impl), F.cross_entropy(logits, targets))}
    for impl in impls:
        assert IGPT(cfg, impl=impl).impl == impl
        for name, (op, expected) in ops.items():
            torch.testing.assert_close(op(impl), expected, msg=lambda m: f"{name} impl={impl}: {m}")
    for other in ("cuda", "TRITON", ""):
        with pytest.raises(ValueError, match="impl"):
            IGPT(cfg, impl=other)
        for name, (op, _) in ops.items():
            with pytest.raises(ValueError, match=f"{name}: impl must be one of"):
                op(other)


def test_every_resize_choice_is_a_mode_resize_image_takes():
    found = choices("resize")
    assert {"palette", "tokenize", "sample"} <= set(found)
    assert len(set(found.values())) == 1
    image = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3))
    for mode in next(iter(found.values())):
        assert resize_image(image, 4, mode).shape == (4, 4, 3)
    with pytest.raises(TokenizeError, match="unknown resize mode"):
        resize_image(image, 4, "crop")
