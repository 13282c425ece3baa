"""How a training run ends before its last step, or is made to end on time: signals and the time budget.

Kept apart from train.py's loop because both are about the process and the clock, not the
optimisation: the loop asks `StopOnSignal` whether a signal came and `TimeBudget` how many steps fit,
and does the saving, evaluating and plotting itself.

Signals: SIGTERM (preemption, torchrun's shutdown, a launcher that died: distributed.py) or SIGINT
(Ctrl-C) while the loop runs lets the current step finish, logs it, writes its checkpoint and raises
RunStopped (the CLI prints its one line, naming the checkpoint, and exits 128 + signal: 143, 130);
`--resume auto` continues from that step. A second Ctrl-C aborts at once, without saving. Under
torchrun the ranks agree on the step to stop after: each rank's signal flags ride on the step's loss
all-reduce (train.train_step; no extra collective), so every rank saves the same step (the FSDP save is
collective) and exits with the same code. torchrun gives its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT
(30 s by default) between its SIGTERM and a SIGKILL: a step plus a save must fit in it. Before the
loop and after its last checkpoint the signals keep their usual effect (nothing is lost there).

Time budget (max_minutes, `--max-minutes`): the step count, and with it the cosine, is fitted to a
wall-clock budget once, at the end of warmup (`TimeBudget`); from then on the run is an ordinary
N-step run whose checkpoints record N, so it resumes like any other.
"""
import math
import signal
import statistics
import threading
import time
from collections import deque

import torch
import torch.distributed as dist

__all__ = ["StopOnSignal", "TimeBudget", "UNBOUNDED_STEPS"]

# TimeBudget: steps left out of the timing (compile, autotune), steps timed before a plan, share of the
# budget after which the plan happens even inside warmup, spare time in the plan, steps in the running median
TIME_SKIP, TIME_MIN_TIMED, TIME_PLAN_FRACTION, TIME_MARGIN, TIME_WINDOW = 2, 5, 0.1, 0.97, 20
UNBOUNDED_STEPS = 10**9  # --steps when --max-minutes alone bounds a run


class StopOnSignal:
    """While the loop runs: SIGTERM and SIGINT set run.signal_received (the loop finishes its step, saves and
    stops); a second SIGINT aborts at once (KeyboardInterrupt). Handlers are installed from the main
    thread only (Python's rule); the previous ones come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, run):
        self.run, self.previous = run, {}

    def _handle(self, signum, frame):
        if self.run.signal_received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.run.signal_received = self.run.signal_received or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _rank0(run, value):
    """An int as rank 0 has it, on every rank (a broadcast under torchrun)."""
    if run.world_size == 1:
        return value
    agreed = torch.tensor([value], dtype=torch.int64, device=run.device)
    dist.broadcast(agreed, src=0)
    return int(agreed.item())


class TimeBudget:
    """max_minutes: end a run on time with its cosine schedule completed, by fitting the step count to the
    budget once, at the end of warmup.

    The clock starts when `train` is called (setup, data loader start and a resume's load count). The steps
    of this process are timed (the first TIME_SKIP, which compile and autotune, left out). At the end of
    warmup, or once TIME_PLAN_FRACTION of the budget is spent if that comes first (never before
    TIME_MIN_TIMED timed steps), the loop writes a checkpoint, evaluates and plots once (`pause`, timing
    each), and tcfg.steps becomes the steps that fit what is left at the measured cost per step (the median
    of the latest timed steps, plus the evaluations and checkpoints of eval_every / ckpt_every amortised),
    less the final checkpoint, evaluation and plot, with TIME_MARGIN to spare; never more than the steps
    given, which are an upper bound. A warmup longer than a fifth of that is cut to a fifth. The plan is
    a row of log.jsonl ({"step", "time_plan": {...}}) and one printed line.

    Why the steps and not the LR over elapsed time: the warmup does not depend on the total, so nothing
    before the plan changes, and after it the LR is a function of the step as in any run (train.lr_at): a
    run with the same plan is the same run, whatever the clock did, and a checkpoint records steps=N (and
    max_minutes=0), so `--resume auto` continues that schedule exactly; a schedule over elapsed time
    would make every LR depend on timing noise and a resume on the time already spent. A resume given
    --max-minutes again re-fits the remaining steps to its own budget (fewer, never more than the
    checkpoint's unless --steps says so).

    Should the steps then run slower than planned (the median of the latest TIME_WINDOW steps), N shrinks
    to what still fits, checked after every step: the cosine ends a little early rather than the run
    late. N never grows. Under torchrun rank 0 decides and the ranks follow (one broadcast per step).
    """

    def __init__(self, max_minutes, started):
        self.budget_s = 60.0 * max_minutes
        self.started = started
        self.planned = False
        self.step_s = deque(maxlen=TIME_WINDOW)  # durations of this process's latest steps
        self.timed = 0
        self.eval_s = self.save_s = self.plot_s = 0.0
        self.announced = 0  # the steps of the plan or of the last shrink printed

    def elapsed(self):
        return time.perf_counter() - self.started

    def _per_step(self, tcfg):
        """Seconds one more step costs: the latest steps' median (one stalled step -- a page fault, another
        process on the machine, a data-loader hiccup -- must not cut the run short for good, since N never
        grows), plus evaluations and checkpoints amortised. Steps slower than the median for longer are still
        caught: each check fits the steps to the time actually left."""
        per_step = statistics.median(self.step_s)
        if tcfg.eval_every:
            per_step += self.eval_s / tcfg.eval_every
        if tcfg.ckpt_every:
            per_step += self.save_s / tcfg.ckpt_every
        return per_step

    def _fit(self, run, margin):
        """The last step that fits the budget (at least run.step, at most tcfg.steps); rank 0's on every rank."""
        final_s = self.eval_s + self.save_s + self.plot_s
        left = self.budget_s - self.elapsed() - final_s
        fits = run.step + max(0, math.floor(margin * left / self._per_step(run.tcfg)))
        return _rank0(run, min(run.tcfg.steps, fits))

    def after_step(self, run, seconds, pause):
        """Time a step; plan at the end of warmup, shrink when behind. pause() saves, evaluates and plots,
        returning the seconds of each. True when it paused."""
        tcfg = run.tcfg
        self.timed += 1
        if self.timed > TIME_SKIP:
            self.step_s.append(seconds)
        if run.step >= tcfg.steps:
            return False
        if self.planned:
            last = self._fit(run, 1.0)
            if last < tcfg.steps and last < 0.99 * self.announced:  # said once per 1% lost
                run.say(f"time budget: steps now take {self._per_step(tcfg) * 1e3:.1f} ms; the run ends at step "
                        f"{last} instead of {self.announced}")
                run.log({"step": run.step, "time_shrink": {"steps": last, "was": self.announced}})
                self.announced = last
            tcfg.steps = min(tcfg.steps, last)
            return False
        if len(self.step_s) < TIME_MIN_TIMED or not _rank0(run, int(
                run.step >= tcfg.warmup_steps or self.elapsed() >= TIME_PLAN_FRACTION * self.budget_s)):
            return False
        self.save_s, self.eval_s, self.plot_s = pause()
        upper = tcfg.steps
        tcfg.steps = self.announced = self._fit(run, TIME_MARGIN)
        if run.step < tcfg.warmup_steps and tcfg.warmup_steps > tcfg.steps // 5:  # the plan came before warmup's end
            tcfg.warmup_steps = max(run.step, tcfg.steps // 5)
        tcfg.max_minutes = 0.0  # the checkpoints from here on hold an ordinary N-step run
        self.planned = True
        plan = {"steps": tcfg.steps, "upper_bound": upper, "warmup_steps": tcfg.warmup_steps,
                "budget_s": self.budget_s, "elapsed_s": round(self.elapsed(), 3),
                "ms_per_step": round(1e3 * self._per_step(tcfg), 3), "save_s": round(self.save_s, 3),
                "eval_s": round(self.eval_s, 3), "plot_s": round(self.plot_s, 3), "margin": TIME_MARGIN}
        run.log({"step": run.step, "time_plan": plan})
        run.say(f"time budget: {self.budget_s:g} s, {plan['elapsed_s']:.1f} s spent by step {run.step}, "
                f"{plan['ms_per_step']:.1f} ms/step -> {tcfg.steps} steps (final checkpoint + eval + plot "
                f"{self.save_s + self.eval_s + self.plot_s:.1f} s)")
        return True
