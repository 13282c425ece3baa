"""The Image GPT transformer: GPTConfig, PRESETS and IGPT (AR and BERT objectives, features, KV cache).

Semantics follow the official release (openai/image-gpt src/model.py) and the paper ("Generative
Pretraining from Pixels", Chen et al., ICML 2020, sections 2-3):
- norm `x / sqrt(mean(x^2) + 1e-5) * g` (no mean subtraction, no bias), bias-free linears,
  quick GELU `x * sigmoid(1.702 x)`, pre-norm blocks, final ln_f;
- learned token table (n_vocab rows), learned positions (n_ctx rows), learned sos vector: the AR
  model embeds [sos, x_0 .. x_{T-2}] so logits[:, i] predict x_i (the shift happens inside);
- BERT: each position masked with p = bert_mask_prob (fresh mask every loss-computing forward), masked
  token embeddings zeroed (no mask token, no sos), no causal mask, loss over masked positions only
  (mean per image, then over the batch, as in the official code);
- untied zero-initialised bias-free head; init tok N(0, .02), pos N(0, .01), sos N(0, .02),
  q/k/v N(0, 1/sqrt(n_embd)), attention out-projection N(0, 1/sqrt(n_embd * n_layer)), MLP N(0, .02).

Attention goes through igpt_fast.kernels.attention and the loss through kernels.cross_entropy, so
the Triton kernels are used on CUDA. q, k, v are one fused Linear(n_embd, 3 n_embd) (rows q | k | v,
head h at rows h*hd:(h+1)*hd of each), which is the HF layout transposed.

Generation uses a KV cache (pattern of pytorch-labs/gpt-fast): setup_cache(B) gives each attention
layer a static KVCache module, prefill(prefix), then decode(tok, t) with the position explicit: O(n_ctx)
work per image instead of O(n_ctx^2). decode attends to the filled prefix (fast eagerly);
decode_static(tok, t_tensor) keeps every shape independent of the position (the whole cache with a
mask on CUDA, the opaque prefix_attention op on the CPU), so torch.compile makes one graph of it
(igpt_fast.sample.generate(compile=True)).

The CPU training step avoids elementwise passes: quick GELU is silu(1.702 h) / 1.702 with the
factors folded into the MLP weights (MLP), and the fp32 norm has a written-out backward
(_RMSNormFunction). A classification head (average-pooled ln_f output -> zero-init
bias-free Linear(n_embd, n_classes)) exists when config.n_classes > 0; `Classifier` wraps the model
for finetuning, so forward keeps nanoGPT's (logits, loss) contract.
"""
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from igpt_fast.kernels import attention, cross_entropy
from igpt_fast.options import IMPLS

QUICK_GELU = 1.702  # quick GELU x * sigmoid(1.702 x)


@dataclass
class GPTConfig:
    """The architecture, and nothing about how to run it (that is IGPT's impl / grad_checkpoint)."""

    n_px: int = 32  # image side; the sequence is n_px * n_px pixels in raster order
    n_vocab: int = 512  # palette size
    n_layer: int = 24
    n_head: int = 8
    n_embd: int = 512
    objective: str = "ar"  # "ar" (next pixel) or "bert" (masked pixels)
    bert_mask_prob: float = 0.15
    dropout: float = 0.0  # on embeddings and residual branches (the paper used none)
    n_classes: int = 0  # > 0: the model has the finetuning classification head

    def __post_init__(self) -> None:
        if self.objective not in ("ar", "bert"):
            raise ValueError(f"objective must be 'ar' or 'bert', got {self.objective!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not 0.0 < self.bert_mask_prob < 1.0:
            raise ValueError(f"bert_mask_prob must be in (0, 1), got {self.bert_mask_prob}")

    @property
    def n_ctx(self) -> int:
        return self.n_px * self.n_px


# Sizes from the paper (table of section 4); "tiny" trains on two CPU cores in minutes (demo, tests).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_px=32, n_layer=4, n_head=4, n_embd=128),
    "igpt-s": dict(n_px=32, n_layer=24, n_head=8, n_embd=512),
    "igpt-m": dict(n_px=32, n_layer=36, n_head=8, n_embd=1024),
    "igpt-l": dict(n_px=32, n_layer=48, n_head=16, n_embd=1536),
    "igpt-xl": dict(n_px=64, n_layer=60, n_head=16, n_embd=3072),
}


def autocast(device: torch.device | str) -> AbstractContextManager:
    """The precision a model runs in on `device` (train, probe and sample alike): bf16 autocast on CUDA
    (the Triton attention takes bf16, not fp32); nothing elsewhere (the model's own dtype, fp32)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _rms_norm(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) of x2 (N, C): y = x2 * rstd * weight, rstd = 1 / sqrt(mean(x2^2, -1) + eps) (N, 1)."""
    # mean(x^2) as |x|^2 / C: one vectorised reduction instead of a square pass and a mean
    rstd = torch.linalg.vector_norm(x2, dim=-1, keepdim=True).square_().div_(x2.size(-1)).add_(eps).rsqrt_()
    return torch.mul(x2, weight).mul_(rstd), rstd


class _RMSNormFunction(torch.autograd.Function):
    """y = x / sqrt(mean(x^2, -1) + eps) * g for a float32 / float64 x on the CPU, with a written-out
    backward. Autograd through the composite (square, mean, rsqrt, two products) makes about fifteen
    passes over x in the backward; this one makes seven and saves only x, g and rstd (N, 1). Once
    differentiable (training needs no second derivative).

    With xh = x * rstd and gw = dy * g, per row: dx = rstd * (gw - xh * mean(gw * xh)) and
    dg = sum over rows of dy * xh."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.size(-1))  # (N, C)
        y, rstd = _rms_norm(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        C = x2.size(-1)
        dy2 = dy.reshape(-1, C)  # (N, C)
        dy_xh = torch.mul(dy2, x2).mul_(rstd)  # (N, C): dy * xh
        dw = dy_xh.sum(0) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            coef = (dy_xh @ weight).unsqueeze(1).mul_(rstd).div_(-C)  # (N, 1): -rstd mean(gw xh)
            dx = torch.mul(dy2, weight).addcmul_(x2, coef).mul_(rstd).view_as(dy)
        return dx, dw, None


class RMSNorm(nn.Module):
    """iGPT's norm: x / sqrt(mean(x^2) + eps) * g, computed in fp32, no bias.

    float32 / float64 on the CPU: _RMSNormFunction (a fused backward); other float32 / float64
    devices: F.rms_norm with the gain (one fused op where torch has one); lower precisions: the norm
    in float32, rounded to x's dtype, then the gain."""

    def __init__(self, n_embd: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64) and x.dtype == self.weight.dtype:
            if x.device.type != "cpu":
                return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return _RMSNormFunction.apply(x, self.weight, self.eps)
            return _rms_norm(x.reshape(-1, x.size(-1)), self.weight, self.eps)[0].view_as(x)
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype) * self.weight


class KVCache(nn.Module):
    """Keys and values of one attention layer for generation: (B, n_head, n_ctx, head_dim) buffers
    (pytorch-labs/gpt-fast's static cache).

    `update(input_pos, k, v)` writes k, v (B, nh, T, hd) at the positions input_pos (T,) and returns
    the whole buffers (B, nh, n_ctx, hd); `mask(pos)` is the (1, 1, 1, n_ctx) bool mask of the
    positions a query at position pos (a 1-element tensor) sees. Shapes never depend on the
    position, so one compiled decode step serves every pixel; the eager decode slices the filled
    prefix instead."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    positions: torch.Tensor

    def __init__(self, batch_size: int, n_head: int, n_ctx: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_head, n_ctx, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("positions", torch.arange(n_ctx, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = k.size(0)
        k_out, v_out = self.k_cache[:B], self.v_cache[:B]  # (B, nh, n_ctx, hd)
        k_out[:, :, input_pos] = k
        v_out[:, :, input_pos] = v
        return k_out, v_out

    def mask(self, pos: torch.Tensor) -> torch.Tensor:
        return (self.positions <= pos).view(1, 1, 1, -1)  # (1, 1, 1, n_ctx)


def masked_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """One query per sequence q (B, nh, 1, hd) against the whole cache (B, nh, n_ctx, hd), positions
    outside mask (1, 1, 1, n_ctx) left out: every shape is static, so CUDA graphs can replay it."""
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)


@torch.library.custom_op("igpt_fast::prefix_attention", mutates_args=())
def prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pos: torch.Tensor) -> torch.Tensor:
    """One query per sequence q (B, nh, 1, hd) at position pos (a 1-element CPU tensor) against cache
    positions 0 .. pos. An opaque op to torch.compile, so the compiled step keeps static shapes while
    reading only the filled prefix (on the CPU, decoding is bound by reading the cache: attending
    to the whole masked cache costs about twice as much). It reads pos on the host, which a CUDA
    graph cannot replay, so CUDA takes masked_attention."""
    n = int(pos.reshape(-1)[0]) + 1
    return F.scaled_dot_product_attention(q, k_cache[:, :, :n], v_cache[:, :, :n]).contiguous()


@prefix_attention.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous, as the real op returns


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.impl = "auto"  # set by IGPT
        self.kv_cache: KVCache | None = None  # a KVCache while IGPT.setup_cache is in effect

    def forward(self, x: torch.Tensor, causal: bool = True, input_pos: torch.Tensor | None = None,
                kv_len: int | None = None) -> torch.Tensor:
        """x (B, T, C). input_pos None: a plain forward. input_pos (T,): positions of x in the
        sequence; keys and values go through the KV cache. kv_len (int): the number of filled cache
        positions after this write (eager: a prefill at 0, where kv_len = T, or one token, attending
        to the first kv_len keys); kv_len None: one token, every shape static (the step that
        torch.compile compiles; see IGPT.decode_static)."""
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        if input_pos is None:
            y = attention(q, k, v, causal=causal, impl=self.impl)
        else:
            assert self.kv_cache is not None, "IGPT.setup_cache first"  # IGPT._cached_step checks it
            k_all, v_all = self.kv_cache.update(input_pos, k, v)  # (B, nh, n_ctx, hd)
            if kv_len is None and T == 1:  # static shapes (the compiled step)
                if x.device.type == "cpu":
                    y = prefix_attention(q, k_all, v_all, input_pos)
                else:
                    y = masked_attention(q, k_all, v_all, self.kv_cache.mask(input_pos))
            elif kv_len == T:  # prefill from position 0
                y = attention(q, k, v, causal=True, impl=self.impl)
            elif T == 1:  # one query against the cached prefix: nothing to mask; Tq != Tk
                y = attention(q, k_all[:, :, :kv_len], v_all[:, :, :kv_len], causal=False, impl="torch")
            else:
                raise ValueError("the KV cache takes a prefill at position 0 or one token at a time")
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    """c_proj(quick_gelu(c_fc(x))), quick GELU h * sigmoid(1.702 h) computed as silu(1.702 h) / 1.702
    (the same function): one fused op forward and one backward instead of four elementwise passes.
    The factors 1.702 and 1 / 1.702 go where they cost least: into c_fc's and c_proj's weights when
    there are more tokens than channels (training), onto the activations otherwise (decoding)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() >= x.size(-1) ** 2:  # tokens >= channels: scale the weights (4 C^2 elements)
            h = F.linear(x, self.c_fc.weight * QUICK_GELU)  # (B, T, 4C): 1.702 c_fc(x)
            return F.linear(F.silu(h), self.c_proj.weight * (1.0 / QUICK_GELU))
        h = self.c_fc(x) * QUICK_GELU  # (B, T, 4C)
        return self.c_proj(F.silu(h) * (1.0 / QUICK_GELU))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd)
        self.attn = Attention(config)
        self.ln_2 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, causal: bool = True, input_pos: torch.Tensor | None = None,
                kv_len: int | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), causal, input_pos, kv_len))
        return x + self.drop(self.mlp(self.ln_2(x)))


class IGPT(nn.Module):
    """The model. impl ("auto" | "triton" | "torch": kernels for attention and the loss) and
    grad_checkpoint (recompute each block in backward) say how to run it; they are not part of the
    config and never saved, so a model trained on a GPU with the Triton kernels runs on a CPU."""

    def __init__(self, config: GPTConfig, impl: str = "auto", grad_checkpoint: bool = False) -> None:
        super().__init__()
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.n_vocab, C)
        self.wpe = nn.Embedding(config.n_ctx, C)
        self.sos = nn.Parameter(torch.zeros(C))
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])  # iterate through _blocks()
        self.ln_f = RMSNorm(C)
        self.lm_head = nn.Linear(C, config.n_vocab, bias=False)
        self.clf_head = nn.Linear(C, config.n_classes, bias=False) if config.n_classes > 0 else None
        self.impl = impl
        self.grad_checkpoint = grad_checkpoint
        self.reset_parameters()

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self._impl = impl
        for block in self._blocks():
            block.attn.impl = impl

    def _blocks(self) -> Sequence[Block]:
        """self.h with its item type (nn.ModuleList's items are typed as plain Modules)."""
        return cast(Sequence[Block], self.h)

    def reset_parameters(self) -> None:
        """The paper's init (official src/model.py): see the module docstring."""
        C, L = self.config.n_embd, self.config.n_layer
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)
        nn.init.normal_(self.sos, std=0.02)
        for block in self._blocks():
            nn.init.normal_(block.attn.c_attn.weight, std=1.0 / math.sqrt(C))
            nn.init.normal_(block.attn.c_proj.weight, std=1.0 / math.sqrt(C * L))
            nn.init.normal_(block.mlp.c_fc.weight, std=0.02)
            nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
            nn.init.ones_(block.ln_1.weight)
            nn.init.ones_(block.ln_2.weight)
        nn.init.ones_(self.ln_f.weight)
        nn.init.zeros_(self.lm_head.weight)
        if self.clf_head is not None:
            nn.init.zeros_(self.clf_head.weight)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the position table (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def _embed(self, idx: torch.Tensor, bert_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) raw tokens -> block input (B, T, C). AR: [sos, x_0 .. x_{T-2}] + positions.
        BERT: token embeddings zeroed where bert_mask is True, + positions."""
        B, T = idx.shape
        if T > self.config.n_ctx:
            raise ValueError(f"sequence length {T} exceeds n_ctx {self.config.n_ctx}")
        tok = self.wte(idx)  # (B, T, C)
        if self.config.objective == "ar":
            sos = self.sos.to(tok.dtype).expand(B, 1, -1)  # (B, 1, C)
            tok = torch.cat([sos, tok[:, :-1]], dim=1)  # (B, T, C)
        elif bert_mask is not None:
            tok = tok * (~bert_mask).unsqueeze(-1).to(tok.dtype)
        return self.drop(tok + self.wpe.weight[:T])

    def trunk(self, idx: torch.Tensor, bert_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding, blocks, ln_f: idx (B, T) -> (B, T, C)."""
        x = self._embed(idx, bert_mask)
        causal = self.config.objective == "ar"
        for block in self._blocks():
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal)
        return self.ln_f(x)

    def sample_bert_mask(self, idx: torch.Tensor) -> torch.Tensor:
        """A fresh (B, T) bool mask, True where a pixel is masked (p = bert_mask_prob each)."""
        return torch.rand(idx.shape, device=idx.device) < self.config.bert_mask_prob

    def gen_loss(self, logits: torch.Tensor, targets: torch.Tensor,
                 bert_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L_GEN: mean next-pixel cross-entropy (AR), or for BERT the mean over each image's masked
        pixels, then over the batch (official src/model.py)."""
        V = logits.size(-1)
        if bert_mask is None:
            return cross_entropy(logits.reshape(-1, V), targets.reshape(-1), impl=self.impl)
        per_tok = cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none",
                                impl=self.impl).view_as(targets)  # (B, T)
        m = bert_mask.to(per_tok.dtype)
        return ((per_tok * m).sum(1) / m.sum(1).clamp(min=1.0)).mean()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                bert_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T <= n_ctx) raw tokens; targets (B, T) (usually idx itself) or None.
        Returns (logits (B, T, n_vocab), loss or None). BERT: when targets are given and bert_mask
        is None a fresh mask is drawn (from torch's global RNG); without targets nothing is masked
        unless bert_mask is passed."""
        if self.config.objective == "bert" and bert_mask is None and targets is not None:
            bert_mask = self.sample_bert_mask(idx)
        logits = self.lm_head(self.trunk(idx, bert_mask))
        loss = None if targets is None else self.gen_loss(logits, targets, bert_mask)
        return logits, loss

    def add_classifier(self, n_classes: int) -> "IGPT":
        """Add (or replace) the zero-initialised classification head; updates config.n_classes."""
        p = self.lm_head.weight
        self.clf_head = nn.Linear(self.config.n_embd, n_classes, bias=False).to(device=p.device, dtype=p.dtype)
        nn.init.zeros_(self.clf_head.weight)
        self.config.n_classes = n_classes
        return self

    @torch.no_grad()
    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """Linear-probe features (paper section 3.3), one forward: (B, n_layer + 1, n_embd) where
        row l < n_layer is the mean over positions of block l's ln_1 output and the last row the
        mean of the ln_f output. Nothing is masked for BERT."""
        x = self._embed(idx)
        causal = self.config.objective == "ar"
        feats = []
        for block in self._blocks():
            feats.append(block.ln_1(x).mean(dim=1))  # (B, C)
            x = block(x, causal)
        feats.append(self.ln_f(x).mean(dim=1))
        return torch.stack(feats, dim=1)  # (B, n_layer + 1, C)

    def setup_cache(self, batch_size: int, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Give every attention layer a KVCache for batch_size sequences of n_ctx tokens; caches of that
        batch size, device and dtype already in place are kept (their buffers, and so a compiled
        decode step's inputs, stay the same)."""
        if self.config.objective != "ar":
            raise ValueError("the KV cache is for AR models; a BERT model cannot generate left to right")
        p = self.lm_head.weight
        c = self.config
        device, dtype = torch.device(device or p.device), dtype or p.dtype
        shape = (batch_size, c.n_head, c.n_ctx, c.n_embd // c.n_head)
        for block in self._blocks():
            old = block.attn.kv_cache
            if (old is None or old.k_cache.shape != shape or old.k_cache.dtype != dtype
                    or old.k_cache.device != device):
                block.attn.kv_cache = KVCache(*shape, device=device, dtype=dtype)

    def clear_cache(self) -> None:
        for block in self._blocks():
            block.attn.kv_cache = None

    def _cached_step(self, x: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        if self._blocks()[0].attn.kv_cache is None:
            raise RuntimeError("call model.setup_cache(batch_size) before prefill() / decode()")
        for block in self._blocks():
            x = block(x, True, input_pos, kv_len)
        return self.lm_head(self.ln_f(x[:, -1]))  # (B, n_vocab)

    @torch.inference_mode()
    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        """Start generation. prefix (B, t) raw tokens x_0 .. x_{t-1}, 0 <= t < n_ctx (t = 0 for
        unconditional samples). Caches the inputs [sos, x_0 .. x_{t-1}] (positions 0 .. t) and
        returns the logits (B, n_vocab) for x_t."""
        B, t = prefix.shape
        if t >= self.config.n_ctx:
            raise ValueError(f"prefix length {t} leaves nothing to generate (n_ctx {self.config.n_ctx})")
        pad = torch.zeros(B, 1, dtype=prefix.dtype, device=prefix.device)
        x = self._embed(torch.cat([prefix, pad], dim=1))  # (B, t+1, C): [sos, x_0 .. x_{t-1}]
        return self._cached_step(x, torch.arange(t + 1, device=prefix.device), t + 1)

    @torch.inference_mode()
    def decode(self, tok: torch.Tensor, t: int) -> torch.Tensor:
        """Feed x_t (tok, shape (B,)), the token just chosen for pixel t, which is the input at
        position t + 1; returns the logits (B, n_vocab) for x_{t+1}. Valid for t + 1 < n_ctx, after
        prefill and the decode steps of the pixels before t. Attends to the t + 2 filled cache
        positions only (the fast eager step; `decode_static` is the one to compile)."""
        if not 0 <= t < self.config.n_ctx - 1:
            raise ValueError(f"decode(tok, t) needs 0 <= t < n_ctx - 1 = {self.config.n_ctx - 1}, got t = {t}")
        kv_cache = self._blocks()[0].attn.kv_cache
        if kv_cache is None:
            raise RuntimeError("call model.setup_cache(batch_size) before prefill() / decode()")
        input_pos = kv_cache.positions[t + 1:t + 2]  # (1,)
        x = self.wte(tok).unsqueeze(1) + self.wpe.weight[t + 1]  # (B, 1, C)
        return self._cached_step(x, input_pos, t + 2)

    @torch.no_grad()
    def decode_static(self, tok: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """decode(tok, t) with t a 1-element int64 tensor on the model's device and every shape
        independent of t: on CUDA the query attends to the whole static cache through a mask
        (masked_attention), on the CPU to the filled prefix through the opaque prefix_attention op.
        This is the step `torch.compile` turns into one graph for all pixels (gpt-fast's
        decode_one_token; with mode="reduce-overhead" on CUDA, one CUDA graph). Nothing is checked
        here: t must satisfy decode's bounds, after prefill and the steps before it."""
        input_pos = t + 1  # (1,)
        x = self.wte(tok).unsqueeze(1) + self.wpe(input_pos)  # (B, 1, C)
        return self._cached_step(x, input_pos)


class Classifier(nn.Module):
    """Finetuning forward (paper section 3.4) around an IGPT with a classification head: one pass
    gives the classifier logits of the average-pooled ln_f output and both losses.

    forward(idx, targets=None, labels=None, bert_mask=None) -> (clf_logits (B, n_classes), gen_loss
    or None, clf_loss or None); the finetune objective is clf_loss + w gen_loss. DDP and
    torch.compile wrap this module, so gradients sync through its forward."""

    def __init__(self, model: IGPT) -> None:
        super().__init__()
        if model.clf_head is None:
            raise ValueError("this model has no classification head: build it with GPTConfig(n_classes=K) "
                             "or call model.add_classifier(K)")
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                bert_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        m = self.model
        if m.config.objective == "bert" and bert_mask is None and targets is not None:
            bert_mask = m.sample_bert_mask(idx)
        h = m.trunk(idx, bert_mask)  # (B, T, C)
        gen_loss = None if targets is None else m.gen_loss(m.lm_head(h), targets, bert_mask)
        assert m.clf_head is not None  # checked in __init__
        clf_logits = m.clf_head(h.mean(dim=1))  # (B, n_classes)
        clf_loss = None if labels is None else cross_entropy(clf_logits, labels, impl="torch")
        return clf_logits, gen_loss, clf_loss
