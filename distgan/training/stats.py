"""What the processes agree on at a gate step: named statistics, each with its reduction, gathered
in one collective (as stylegan2-ada's training_stats), and what they decide (stop, roll back);
and the check that every process holds the same weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from accelerate import Accelerator

from distgan.models.augment import Augment
from distgan.models.dcgan import Generator

if TYPE_CHECKING:
    from distgan.training.gan import StepResult
    from distgan.training.stop import StopRequest

REDUCTIONS = {
    "mean": lambda column: column.mean(),
    "max": lambda column: column.amax(),
    "sum": lambda column: column.sum(),
}


class GateStats:
    """Named statistics this process reports for one gate; `reduce` gathers every process's in
    one collective. Every process reports the same names in the same order (the same code runs
    on all of them), so a new statistic is one `report` line, never a column to shift."""

    def __init__(self) -> None:
        self._reported: dict[str, tuple[torch.Tensor, str]] = {}

    def report(self, name: str, value: torch.Tensor, reduction: str = "mean") -> None:
        """`value` (a device scalar: no host sync here), reduced over processes by `reduction`:
        mean, max or sum."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r}: use one of {', '.join(REDUCTIONS)}")
        self._reported[name] = (value.detach().float().reshape(()), reduction)

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        """{name: value over all processes}, the same on every process."""
        local = torch.stack([value for value, _ in self._reported.values()])
        table = accelerator.gather(local[None]).cpu()  # [processes, statistics]
        reductions = [reduction for _, reduction in self._reported.values()]
        return {
            name: REDUCTIONS[reduction](table[:, column]).item()
            for column, (name, reduction) in enumerate(zip(self._reported, reductions, strict=True))
        }


class Agreement(NamedTuple):
    """What every process knows after a gate step's one collective."""

    loss_d: float
    loss_g: float
    d_real: float  # mean sigmoid(D) on real images
    d_fake: float  # and on generated ones
    skipped_steps: int  # since the last log line
    longest_streak: int  # of consecutive skipped steps
    buffers_finite: bool  # G's BatchNorm statistics, on every process
    stop: str | None  # why the run stops here, or None
    real_sign_sum: float  # sum of sign(D(real)) since the last gate, all processes (ada only)
    real_count: int  # how many logits that sum has


def agree(
    accelerator: Accelerator,
    out: StepResult,
    watch: NonfiniteWatch,
    generator: Generator,
    stop: StopRequest,
    augment: Augment,
) -> Agreement:
    """The gate's one collective: every process reports its logged numbers, non-finite counts,
    stop request and ADA sums; every process derives the same Agreement from the reduction."""
    stats = GateStats()
    stats.report("loss_d", out.loss_d)
    stats.report("loss_g", out.loss_g)
    stats.report("d_real", torch.sigmoid(out.real_logits.detach().float()).mean())
    stats.report("d_fake", torch.sigmoid(out.fake_logits.detach().float()).mean())
    watch.report(stats, generator)
    asked = torch.tensor(float(stop.reason is not None), device=out.loss_d.device)
    stats.report("stop_asked", asked, "max")
    real_sign_sum, real_count = augment.counts()
    stats.report("real_sign_sum", real_sign_sum, "sum")
    stats.report("real_count", real_count, "sum")
    agreed = stats.reduce(accelerator)
    stop_reason = None
    if agreed["stop_asked"]:
        stop_reason = stop.reason or "a signal to another process"
    return Agreement(
        loss_d=agreed["loss_d"],
        loss_g=agreed["loss_g"],
        d_real=agreed["d_real"],
        d_fake=agreed["d_fake"],
        skipped_steps=int(agreed["skipped_steps"]),
        longest_streak=int(agreed["longest_streak"]),
        buffers_finite=not agreed["buffers_nonfinite"],
        stop=stop_reason,
        real_sign_sum=agreed["real_sign_sum"],
        real_count=int(agreed["real_count"]),
    )


class NonfiniteWatch:
    """Steps skipped for non-finite losses or gradients, counted on the device (no host sync),
    read only in the agreement; and the rollbacks done so far."""

    def __init__(self, device: torch.device):
        self.skipped, self.streak, self.worst = (torch.zeros((), device=device) for _ in range(3))
        self.rollbacks = 0

    def record(self, bad_step: torch.Tensor) -> None:
        self.skipped += bad_step
        self.streak = (self.streak + bad_step) * bad_step
        torch.maximum(self.worst, self.streak, out=self.worst)

    def report(self, stats: GateStats, generator: Generator) -> None:
        """The skipped steps, the longest streak, and whether G's BatchNorm statistics are not
        finite (a skipped step leaves the weights alone, but a non-finite forward pass still
        poisons them): the worst process's of each."""
        finite = torch.stack([torch.isfinite(b).all() for b in generator.buffers()]).all()
        stats.report("skipped_steps", self.skipped, "max")
        stats.report("longest_streak", self.worst, "max")
        stats.report("buffers_nonfinite", (~finite).float(), "max")

    def window_done(self) -> None:
        """After a log line: count afresh, keeping the streak that is still running."""
        self.skipped.zero_()
        self.worst.copy_(self.streak)

    def reset(self) -> None:
        for counter in (self.skipped, self.streak, self.worst):
            counter.zero_()


def divergence(verdict: Agreement, step: int, limit: int) -> str | None:
    """Why the run cannot go on as it is, or None."""
    if not verdict.buffers_finite:
        return f"non-finite BatchNorm statistics in G at step {step}"
    if verdict.longest_streak >= limit:
        return f"{verdict.longest_streak} consecutive non-finite steps up to step {step}"
    return None


def check_ddp_consistency(accelerator: Accelerator, modules: dict) -> None:
    """Every process must hold bitwise the same weights (stylegan2-ada's check): a divergence
    means a bug in the distributed setup, so stop rather than write a wrong generator."""
    if accelerator.num_processes == 1:
        return
    for module_name, module in modules.items():
        for name, param in module.named_parameters():
            gathered = accelerator.gather(param.detach().reshape(1, -1))
            if not all(torch.equal(gathered[0], row) for row in gathered[1:]):
                raise RuntimeError(f"{module_name}.{name} differs between processes")
