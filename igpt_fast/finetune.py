"""Finetuning a pretrained IGPT for classification (paper section 3.4), on train.py's loop.

Model: the pretrained checkpoint plus a classification head -- the ln_f output average-pooled over
all positions -> bias-free Linear(n_embd, n_classes), zero-initialised (`IGPT.add_classifier`,
`IGPT.classify`). Objective: L_CLF + gen_weight * L_GEN, where L_GEN is the pretraining objective of
the model (AR next pixel or BERT masked pixels) on the same batch; the paper uses 1:1, gen_weight 0
drops L_GEN (and for BERT the input masking with it). Recipe (docs/IGPT_REFERENCE.md "Downstream"):
a smaller LR than pretraining (default: the pretraining LR / 10), short warmup, cosine decay.

Early stopping: every eval_every steps the classifier's accuracy on (the first eval_batches batches
of) the val split is measured; a better accuracy writes OUT/best.pt (the model and its full
training state), `patience` evaluations without improvement stop the run. The early-stopping state
is rebuilt from OUT/log.jsonl on resume, so an interrupted run resumes with the same decisions.

Everything else is train.train: AdamW, schedule, clipping, accumulation, DDP, atomic checkpoints
(OUT/ckpt.pt is the latest state, for --resume), log.jsonl, loss.png. At the end the best model is
scored on val and test (at most max_eval samples each) and OUT/finetune.json is written.

DDP note: with gen_weight 0 the generative head takes no part in the loss, and train.train builds
DDP without find_unused_parameters, so gen_weight 0 is for single-process runs.
"""
import json
import os

import torch

from igpt_fast.train import (CKPT_NAME, TrainConfig, _all_reduce_sum, check_data,
                             load_checkpoint, model_from_checkpoint, train)

__all__ = ["FinetuneError", "FINETUNE_DIR", "BEST_NAME", "RESULT_NAME", "count_classes", "accuracy",
           "classifier_loss", "EarlyStopping", "finetune"]

FINETUNE_DIR = "finetune"  # RUN/finetune
BEST_NAME = "best.pt"
RESULT_NAME = "finetune.json"


class FinetuneError(ValueError):
    """A finetuning request that cannot run: no pretrained checkpoint, no labels."""


def count_classes(data_dir, meta, split="train", batch_size=1024):
    """Number of classes: len(meta.json's class_names), else 1 + the largest label of `split`."""
    from igpt_fast.data import eval_loader

    if meta.get("class_names"):
        return len(meta["class_names"])
    top = -1
    for _, labels in eval_loader(data_dir, split, batch_size):
        top = max(top, int(labels.max()))
    if top < 1:
        raise FinetuneError(f"the {split} split of {data_dir} has no labels (or a single class); finetuning "
                            "needs labelled shards (`cls` fields)")
    return top + 1


@torch.no_grad()
def accuracy(model, data_dir, split, batch_size=64, max_samples=None, rank=0, world_size=1, device=None,
             autocast=None):
    """(correct, seen) of the classification head on a split (first max_samples samples per process;
    unlabelled samples are skipped). Nothing is masked for BERT."""
    from contextlib import nullcontext

    from igpt_fast.data import eval_loader, read_meta

    device = device or next(model.parameters()).device
    autocast = autocast or nullcontext()
    shards = read_meta(data_dir)["splits"].get(split, {}).get("shards", 0)
    readers = min(shards, world_size)  # ranks beyond the shard count read nothing
    correct = seen = 0
    if rank < readers:
        for tokens, labels in eval_loader(data_dir, split, batch_size, rank=rank, world_size=readers):
            if max_samples is not None and seen >= max_samples:
                break
            keep = labels >= 0
            tokens, labels = tokens[keep].to(device), labels[keep].to(device)
            if max_samples is not None:
                tokens, labels = tokens[:max_samples - seen], labels[:max_samples - seen]
            if len(labels) == 0:
                continue
            with autocast:
                logits, _, _ = model.classify(tokens)
            correct += int((logits.argmax(-1) == labels).sum())
            seen += len(labels)
    return correct, seen


def evaluate_clf(model, data_dir, batch_size, max_batches, rank, world_size, device, autocast, seed):
    """train.train's `evaluate` hook: {"val_acc", "val_n"} over the first max_batches batches per process
    (0 = the whole val split), summed over processes; {} without a val split."""
    max_samples = max_batches * batch_size if max_batches else None
    correct, seen = accuracy(model, data_dir, "val", batch_size, max_samples, rank, world_size, device, autocast)
    total = _all_reduce_sum(torch.tensor([correct, seen], dtype=torch.float64, device=device))
    return {"val_acc": (total[0] / total[1]).item(), "val_n": int(total[1])} if total[1] > 0 else {}


def classifier_loss(gen_weight):
    """train.train's `loss_fn` hook: L_CLF + gen_weight * L_GEN through the (possibly DDP-wrapped)
    model's forward, with the batch's classification accuracy as an extra logged metric."""

    def loss_fn(model, tokens, labels):
        if bool((labels < 0).any()):
            raise FinetuneError("a training batch holds unlabelled samples; finetune on labelled shards")
        targets = tokens if gen_weight > 0 else None
        clf_logits, gen_loss, clf_loss = model(tokens, targets, labels=labels, classify=True)
        metrics = {"clf_loss": clf_loss.detach(), "train_acc": (clf_logits.argmax(-1) == labels).float().mean()}
        if gen_loss is None:
            return clf_loss, metrics
        metrics["gen_loss"] = gen_loss.detach()
        return clf_loss + gen_weight * gen_loss, metrics

    return loss_fn


class EarlyStopping:
    """train.train's `on_eval` hook: keeps OUT/best.pt at the best val accuracy and asks to stop after
    `patience` evaluations without improvement (0 = never stop early).

    resumed=True: the history of evaluations before the first one this process sees is read back from
    log.jsonl (rows with "val_acc" and an earlier step; the last row of a step wins, as a resumed run
    re-logs the steps after its checkpoint)."""

    def __init__(self, out_dir, patience, resumed=True):
        self.out_dir, self.patience = out_dir, patience
        self.best_path = os.path.join(out_dir, BEST_NAME)
        self.best_acc, self.best_step, self.bad, self.stopped = -1.0, None, 0, False
        self._restored = not resumed

    def _restore(self, step):
        self._restored = True
        path = os.path.join(self.out_dir, "log.jsonl")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        history = {r["step"]: r["val_acc"] for r in rows if "val_acc" in r and r["step"] < step}
        for s in sorted(history):
            self._update(s, history[s])

    def _update(self, step, acc):
        if acc > self.best_acc:
            self.best_acc, self.best_step, self.bad = acc, step, 0
            return True
        self.bad += 1
        return False

    def __call__(self, step, metrics, save):
        if "val_acc" not in metrics:
            return False
        if not self._restored:
            self._restore(step)
        if self._update(step, metrics["val_acc"]):
            save(self.best_path, extra={"val_acc": metrics["val_acc"], "step": step})
        self.stopped = bool(self.patience) and self.bad >= self.patience
        return self.stopped


def finetune(run, data_dir, out_dir=None, steps=500, batch_size=16, lr=None, gen_weight=1.0, warmup_steps=None,
             eval_every=100, eval_batches=20, patience=3, max_eval=None, n_classes=None, seed=0, resume=None,
             grad_clip=1.0, weight_decay=0.0, log_every=10, ckpt_every=None, num_workers=0, print_fn=print):
    """Finetune the pretrained RUN (a run folder holding ckpt.pt, or a checkpoint file) on the labelled
    shards in data_dir; see the module docstring. Returns the dict written to OUT/finetune.json
    ({"val_acc", "test_acc", "best_step", "stopped_early", ...}) on the main process, None elsewhere.

    out_dir defaults to RUN/finetune. lr None: the pretraining LR / 10 (3e-4 when the checkpoint has no
    training config). warmup_steps None: steps // 10. ckpt_every None: eval_every. resume: None
    (fresh), "auto" (OUT/ckpt.pt when present; a finished run -- OUT/finetune.json present -- is
    returned as it is) or a checkpoint path.
    """
    import torch.distributed as dist

    from igpt_fast.data import read_meta

    run = os.fspath(run)
    ckpt_path = os.path.join(run, CKPT_NAME) if os.path.isdir(run) else run
    if not os.path.isfile(ckpt_path):
        raise FinetuneError(f"{ckpt_path} not found; pretrain first (`igpt-fast train DATA --out RUN`) or pass "
                            "a checkpoint file")
    run_dir = os.path.dirname(os.path.abspath(ckpt_path))
    out_dir = out_dir or os.path.join(run_dir, FINETUNE_DIR)
    result_path = os.path.join(out_dir, RESULT_NAME)
    state_path = os.path.join(out_dir, CKPT_NAME)
    if resume == "auto":
        if os.path.isfile(result_path):
            with open(result_path) as f:
                return json.load(f)
        resume = state_path if os.path.isfile(state_path) else None

    meta = read_meta(data_dir)
    if "val" not in meta["splits"]:
        raise FinetuneError(f"{data_dir} has no val split for early stopping; re-tokenize with --val-fraction")
    pretrained = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(pretrained)
    check_data(meta, model.config, pretrained.get("palette_sha256"), data_dir)
    pretrain_lr = (pretrained.get("train_config") or {}).get("lr")
    del pretrained
    if lr is None:
        lr = pretrain_lr / 10 if pretrain_lr else 3e-4
    if resume is None:
        model.add_classifier(n_classes or count_classes(data_dir, meta))
    elif not os.path.isfile(resume):
        raise FinetuneError(f"--resume {resume}: no such checkpoint")

    tcfg = TrainConfig(data_dir=data_dir, out_dir=out_dir, steps=steps, batch_size=batch_size, lr=lr,
                       warmup_steps=steps // 10 if warmup_steps is None else warmup_steps, weight_decay=weight_decay,
                       grad_clip=grad_clip, log_every=log_every, eval_every=eval_every, eval_batches=eval_batches,
                       ckpt_every=eval_every if ckpt_every is None else ckpt_every, seed=seed,
                       num_workers=num_workers)
    stopper = EarlyStopping(out_dir, patience, resumed=resume is not None)
    out = train(model.config, tcfg, resume=resume, model=model, loss_fn=classifier_loss(gen_weight),
                evaluate=evaluate_clf, on_eval=stopper, print_fn=print_fn)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None

    best_ckpt = load_checkpoint(stopper.best_path)
    best = model_from_checkpoint(best_ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    best = best.to(device).eval()
    scores = {}
    for split in ("val", "test"):
        if split in meta["splits"]:
            correct, seen = accuracy(best, data_dir, split, batch_size=64, max_samples=max_eval, device=device)
            scores[split] = (correct / seen if seen else None, seen)
    result = {"val_acc": scores["val"][0], "n_val": scores["val"][1],
              "test_acc": scores["test"][0] if "test" in scores else None,
              "n_test": scores["test"][1] if "test" in scores else 0,
              "best_step": best_ckpt["extra"]["step"], "best_val_acc_during_training": best_ckpt["extra"]["val_acc"],
              "steps_run": out["step"], "stopped_early": out["step"] < steps, "steps": steps,
              "n_classes": best.config.n_classes, "gen_weight": gen_weight, "lr": lr, "pretrain_lr": pretrain_lr,
              "batch_size": batch_size, "eval_every": eval_every, "eval_batches": eval_batches, "patience": patience,
              "max_eval": max_eval, "objective": best.config.objective, "pretrained": os.path.abspath(ckpt_path),
              "data": os.path.abspath(data_dir), "best": os.path.abspath(stopper.best_path),
              "ckpt": os.path.abspath(state_path)}
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)
    print_fn(f"finetune | best step {result['best_step']} | val acc {result['val_acc']:.4f} | " +
             (f"test acc {result['test_acc']:.4f} | " if result["test_acc"] is not None else "") + result_path)
    return result
