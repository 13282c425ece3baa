"""Finetuning a pretrained IGPT for classification (paper section 3.4), on train.py's loop.

Model: the pretrained checkpoint plus a classification head -- the ln_f output average-pooled over
all positions -> bias-free Linear(n_embd, n_classes), zero-initialised (`IGPT.add_classifier`,
`model.Classifier`). Objective: L_CLF + gen_weight * L_GEN, where L_GEN is the pretraining objective of
the model (AR next pixel or BERT masked pixels) on the same batch; the paper uses 1:1, gen_weight 0
drops L_GEN (and for BERT the input masking with it). Recipe (paper section 3.4 and the official
release): a smaller LR than pretraining (default: the pretraining LR / 10), short warmup, cosine decay.

Early stopping: every eval_every steps the classifier's accuracy on (the first eval_batches batches
of) the val split is measured; a better accuracy writes OUT/best.pt (the model and its full
training state), `patience` evaluations without improvement stop the run. The early-stopping state
is rebuilt from OUT/log.jsonl on resume, so an interrupted run resumes with the same decisions.

Everything else is train.train, given a TrainConfig: AdamW, schedule, clipping, accumulation, DDP, atomic checkpoints
(OUT/ckpt.pt is the latest state, for --resume), log.jsonl, loss.png, OUT/config.json. At the end the best model
is scored on val and test (at most max_eval samples each, on the run's device) and OUT/finetune.json is written.
OUT/config.json, as train.record writes it when the run starts, has a 'finetune' section: RUN as given and the
FinetuneConfig, so `igpt-fast finetune --config OUT/config.json` repeats the run (run_config.py reads it back).

What it shows: every log step prints (and logs) the combined loss and its parts, L_CLF as `clf_loss`
(nats per image), L_GEN as `gen_loss` (nats per pixel), the batch's `train_acc`; every evaluation
prints `val_acc` (in %, igpt_fast.progress) and `val_n`; OUT/loss.png has a loss panel (L_CLF and L_GEN)
and an accuracy panel (val and train accuracy in %; runlog.plot_losses).

DDP note: with gen_weight 0 the generative head takes no part in the loss, and train.train builds
DDP without find_unused_parameters, so gen_weight 0 is for single-process runs.
"""
import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from igpt_fast.checkpoint import CKPT_NAME, load_checkpoint, model_from_checkpoint, resolve_checkpoint
from igpt_fast.errors import FinetuneError
from igpt_fast.model import Classifier
from igpt_fast.distributed import all_reduce_sum, is_main_process, setup_distributed
from igpt_fast.progress import line
from igpt_fast.resume import ARCH_FIELDS
from igpt_fast.runlog import read_log, write_text_atomic
from igpt_fast.train import Objective, RunOptions, TrainConfig, run_device, save, train

__all__ = ["FinetuneError", "FINETUNE_DIR", "BEST_NAME", "RESULT_NAME", "FinetuneConfig", "count_classes",
           "accuracy", "classifier_loss", "EarlyStopping", "finetune_config", "finetune"]

FINETUNE_DIR = "finetune"  # RUN/finetune
BEST_NAME = "best.pt"
RESULT_NAME = "finetune.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """What finetuning adds to its TrainConfig (finetune_config): the loss mix, early stopping, the scoring."""

    gen_weight: float = 1.0  # L_CLF + gen_weight * L_GEN (0: classification loss only)
    patience: int = 3  # evaluations without a better val accuracy before stopping (0: never)
    max_eval: int | None = None  # the best model is scored on at most this many val and test samples
    n_classes: int | None = None  # default: meta.json's class names, else the train labels


def count_classes(data_dir, meta, split="train", batch_size=1024):
    """Number of classes: len(meta.json's class_names), else 1 + the largest label of `split`."""
    from igpt_fast.data import eval_loader

    if meta.get("class_names"):
        return len(meta["class_names"])
    top = -1
    for _, labels in eval_loader(data_dir, split, batch_size, meta=meta):
        top = max(top, int(labels.max()))
    if top < 1:
        raise FinetuneError(f"the {split} split of {data_dir} has no labels (or a single class); finetuning "
                            "needs labelled shards (`cls` fields)")
    return top + 1


@torch.no_grad()
def accuracy(model, data_dir, split, batch_size=64, max_samples=None, rank=0, world_size=1, device=None,
             autocast=None, meta=None):
    """(correct, seen) of the classification head on a split (first max_samples samples per process;
    unlabelled samples are skipped). Nothing is masked for BERT."""
    from contextlib import nullcontext

    from igpt_fast.data import eval_loader

    device = device or next(model.parameters()).device
    autocast = autocast or nullcontext()
    classify = Classifier(model)
    correct = seen = 0
    for tokens, labels in eval_loader(data_dir, split, batch_size, rank=rank, world_size=world_size, meta=meta):
        if max_samples is not None and seen >= max_samples:
            break
        keep = labels >= 0
        tokens, labels = tokens[keep].to(device), labels[keep].to(device)
        if max_samples is not None:
            tokens, labels = tokens[:max_samples - seen], labels[:max_samples - seen]
        if len(labels) == 0:
            continue
        with autocast:
            logits, _, _ = classify(tokens)
        correct += int((logits.argmax(-1) == labels).sum())
        seen += len(labels)
    return correct, seen


def evaluate_clf(run):
    """train.train's evaluation for finetuning: {"val_acc", "val_n"} over the first eval_batches batches
    per process (0 = the whole val split), summed over processes; {} without a val split."""
    tcfg = run.tcfg
    max_samples = tcfg.eval_batches * tcfg.batch_size if tcfg.eval_batches else None
    correct, seen = accuracy(run.model, tcfg.data_dir, "val", tcfg.batch_size, max_samples, run.rank,
                             run.world_size, run.device, run.autocast, run.meta)
    total = all_reduce_sum(torch.tensor([correct, seen], dtype=torch.float64, device=run.device))
    return {"val_acc": (total[0] / total[1]).item(), "val_n": int(total[1])} if total[1] > 0 else {}


def classifier_loss(gen_weight):
    """train.train's loss for finetuning: L_CLF + gen_weight * L_GEN through the (possibly DDP-wrapped)
    Classifier, with the batch's classification accuracy as an extra logged metric."""

    def loss_fn(module, tokens, labels):
        if bool((labels < 0).any()):
            raise FinetuneError("a training batch holds unlabelled samples; finetune on labelled shards")
        targets = tokens if gen_weight > 0 else None
        clf_logits, gen_loss, clf_loss = module(tokens, targets, labels)
        metrics = {"clf_loss": clf_loss.detach()}
        if gen_loss is not None:
            metrics["gen_loss"] = gen_loss.detach()
        metrics["train_acc"] = (clf_logits.argmax(-1) == labels).float().mean()
        return (clf_loss if gen_loss is None else clf_loss + gen_weight * gen_loss), metrics

    return loss_fn


class EarlyStopping:
    """train.train's `on_eval` for finetuning: keeps OUT/best.pt at the best val accuracy and asks to stop
    after `patience` evaluations without improvement (0 = never stop early).

    resumed=True: the history of evaluations before the first one this process sees is read back from
    log.jsonl (rows with "val_acc" and an earlier step; the last row of a step wins)."""

    def __init__(self, out_dir, patience, resumed=True, save_fn=save):
        self.out_dir, self.patience, self.save_fn = out_dir, patience, save_fn
        self.best_path = os.path.join(out_dir, BEST_NAME)
        self.best_acc, self.best_step, self.bad, self.stopped = -1.0, None, 0, False
        self._restored = not resumed

    def _restore(self, step):
        self._restored = True
        rows = read_log(os.path.join(self.out_dir, "log.jsonl"))
        history = {r["step"]: r["val_acc"] for r in rows if "val_acc" in r and r["step"] < step}
        for s in sorted(history):
            self._update(s, history[s])

    def _update(self, step, acc):
        if acc > self.best_acc:
            self.best_acc, self.best_step, self.bad = acc, step, 0
            return True
        self.bad += 1
        return False

    def __call__(self, run, metrics):
        if "val_acc" not in metrics:
            return False
        if not self._restored:
            self._restore(run.step)
        if self._update(run.step, metrics["val_acc"]):
            self.save_fn(run, self.best_path, extra={"val_acc": metrics["val_acc"], "step": run.step})
        self.stopped = bool(self.patience) and self.bad >= self.patience
        return self.stopped


def _score_best(best_path, data_dir, meta, max_eval, impl, device):
    """{split: (accuracy or None, n)} of the model in best_path on val and test, scored on `device` (the run's)."""
    best = model_from_checkpoint(best_path, impl=impl)
    best = best.to(device).eval()
    scores = {}
    for split in ("val", "test"):
        if split in meta["splits"]:
            correct, seen = accuracy(best, data_dir, split, batch_size=64, max_samples=max_eval, device=device,
                                     meta=meta)
            scores[split] = (correct / seen if seen else None, seen)
    return scores


def finetune_config(data_dir, out_dir=None, steps=500, batch_size=16, lr=None, warmup_steps=None, eval_every=100,
                    eval_batches=20, ckpt_every=None, **kw):
    """A TrainConfig with finetuning's defaults: lr None (the pretraining LR / 10, filled by finetune),
    warmup steps // 10, a checkpoint at every evaluation; other TrainConfig fields pass through."""
    return TrainConfig(data_dir=data_dir, out_dir=out_dir, steps=steps, batch_size=batch_size, lr=lr,
                       warmup_steps=steps // 10 if warmup_steps is None else warmup_steps, eval_every=eval_every,
                       eval_batches=eval_batches, ckpt_every=eval_every if ckpt_every is None else ckpt_every, **kw)


def finetune(run_dir: str, tcfg: TrainConfig, fcfg: FinetuneConfig | None = None, options: RunOptions | None = None,
             resume: str | None = None, overwrite: bool = False, explicit: Iterable[str] | None = None,
             meta: dict | None = None, print_fn: Callable[..., object] = print) -> dict[str, Any] | None:
    """Finetune the pretrained run in run_dir (a run folder holding ckpt.pt, or a checkpoint file) on the
    labelled shards in tcfg.data_dir; see the module docstring. Returns the dict written to
    OUT/finetune.json ({"val_acc", "test_acc", "best_step", "stopped_early", ...}) on the main process,
    None elsewhere.

    tcfg (finetune_config): tcfg.out_dir None: RUN/finetune; tcfg.lr None: the pretraining LR / 10 (3e-4
    when the checkpoint has no training config). fcfg: a FinetuneConfig (default FinetuneConfig()).
    resume: None (fresh), "auto" (OUT/ckpt.pt when present; a finished run -- OUT/finetune.json present
    -- is returned as it is) or a checkpoint path. options (train.RunOptions; DDP only), overwrite,
    explicit, meta: as train.train.
    """
    from igpt_fast.data import check_data, read_meta

    fcfg, options = fcfg or FinetuneConfig(), options or RunOptions()
    ckpt_path = resolve_checkpoint(run_dir)
    out_dir = tcfg.out_dir or os.path.join(os.path.dirname(ckpt_path), FINETUNE_DIR)  # as the caller wrote RUN
    result_path = os.path.join(out_dir, RESULT_NAME)
    state_path = os.path.join(out_dir, CKPT_NAME)
    if resume == "auto":
        if os.path.isfile(result_path):
            with open(result_path) as f:
                return json.load(f)
        resume = state_path if os.path.isfile(state_path) else None

    meta = meta if meta is not None else read_meta(tcfg.data_dir)
    if "val" not in meta["splits"]:
        raise FinetuneError(f"{tcfg.data_dir} has no val split for early stopping; re-tokenize with --val-fraction")
    pretrained = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(pretrained, impl=options.impl, grad_checkpoint=options.grad_checkpoint)
    check_data(meta, model.config, pretrained.get("palette_sha256"), tcfg.data_dir)
    pretrain_lr = (pretrained.get("train_config") or {}).get("lr")
    del pretrained
    lr = tcfg.lr if tcfg.lr is not None else (float(f"{pretrain_lr / 10:.6g}") if pretrain_lr else 3e-4)
    tcfg = dataclasses.replace(tcfg, out_dir=out_dir, lr=lr)
    if resume is None:
        model.add_classifier(fcfg.n_classes or count_classes(tcfg.data_dir, meta))

    # the architecture is the pretrained model's (plus the head): only training fields can be explicit
    explicit = {f.name for f in dataclasses.fields(tcfg)} if explicit is None else set(explicit)
    explicit -= set(ARCH_FIELDS)
    stopper = EarlyStopping(out_dir, fcfg.patience, resumed=resume is not None)
    objective = Objective(classifier_loss(fcfg.gen_weight), evaluate_clf, stopper, classifier=True,
                          sections={"finetune": {"run": run_dir, **dataclasses.asdict(fcfg)}})
    out = train(model.config, tcfg, options, resume, overwrite, explicit, model, meta, objective, print_fn)
    if not is_main_process():
        return None

    best_ckpt = load_checkpoint(stopper.best_path)
    device = run_device(options, setup_distributed()[3])  # the device the run trained on (--device honoured)
    scores = _score_best(best_ckpt, tcfg.data_dir, meta, fcfg.max_eval, options.impl, device)
    c = best_ckpt["model_config"]
    result = {"val_acc": scores["val"][0], "n_val": scores["val"][1],
              "test_acc": scores["test"][0] if "test" in scores else None,
              "n_test": scores["test"][1] if "test" in scores else 0,
              "best_step": best_ckpt["extra"]["step"], "best_val_acc_during_training": best_ckpt["extra"]["val_acc"],
              "steps_run": out["step"], "stopped_early": out["step"] < tcfg.steps, "steps": tcfg.steps,
              "n_classes": c["n_classes"], "gen_weight": fcfg.gen_weight, "lr": tcfg.lr, "pretrain_lr": pretrain_lr,
              "batch_size": tcfg.batch_size, "eval_every": tcfg.eval_every, "eval_batches": tcfg.eval_batches,
              "patience": fcfg.patience, "max_eval": fcfg.max_eval, "objective": c["objective"],
              "pretrained": os.path.abspath(ckpt_path), "data": os.path.abspath(tcfg.data_dir),
              "best": os.path.abspath(stopper.best_path), "ckpt": os.path.abspath(state_path)}
    write_text_atomic(result_path, json.dumps(result, indent=2))
    scores = {"val_acc": result["val_acc"]}
    if result["test_acc"] is not None:
        scores["test_acc"] = result["test_acc"]
    print_fn(line("finetune", best_step=result["best_step"], **scores) + f" | {result_path}")
    return result
