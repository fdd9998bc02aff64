"""Experiment tracking (--report-to) through Accelerate's trackers: TensorBoard and W&B get every
metrics.jsonl line at its step, the sample grids and the resolved config. Accelerate starts and
keeps trackers on the main process only, so on the other processes every call here does nothing.

Files stay in the run folder: TensorBoard's in OUT/tensorboard/ (so `tensorboard --logdir runs/`
shows every run), W&B's in OUT/wandb/ (with WANDB_MODE=offline, all of it: `wandb sync` later).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker
from accelerate.utils import broadcast_object_list, is_wandb_available

from distgan.config.config import Config
from distgan.errors import UserError, first_line

PROJECT = "distgan"  # the W&B project
TENSORBOARD_DIR = "tensorboard"  # OUT/tensorboard/; Accelerate would name it after the project
# The columns of TensorBoard's HParams table: the last value of each of these scalars.
SUMMARY_METRICS = ("train/loss_d", "train/loss_g", "train/d_real", "train/d_fake", "eval/fid")


def is_tensorboard_available() -> bool:
    """TensorBoard itself, through which Accelerate's tracker then writes (torch.utils.tensorboard);
    its tensorboardX fallback is not enough here: `Tracking.rewind` writes TensorBoard's records."""
    return importlib.util.find_spec("tensorboard") is not None


def tracker_names(report_to: str) -> list[str]:
    """The trackers `report_to` asks for; a one-line error naming what to install when one of
    them is not (auto: TensorBoard when it is installed, else none)."""
    installed = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    if report_to == "auto":
        return ["tensorboard"] if installed["tensorboard"] else []
    names = {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])
    missing = [name for name in names if not installed[name]]
    if missing:
        listed = " and ".join(missing)
        raise UserError(
            f"report_to={report_to} needs {listed}, which is not installed: pip install "
            f"{' '.join(missing)} (or pip install -e '.[track]'), or pass --report-to none"
        )
    return names


def make_trackers(report_to: str, out_dir: Path) -> list[GeneralTracker]:
    """Accelerate's trackers for `Accelerator(log_with=...)`, not started yet: TensorBoard in
    OUT/tensorboard/, W&B named after the run folder with its files in OUT/wandb/."""
    trackers: list[GeneralTracker] = []
    for name in tracker_names(report_to):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(TENSORBOARD_DIR, out_dir))
        else:
            trackers.append(WandBTracker(PROJECT, dir=str(out_dir), name=out_dir.name))
    return trackers


def hyperparameters(cfg: Config, accelerator: Accelerator) -> dict:
    """The resolved config as scalars (a list as its text, unset fields left out), with what
    the run resolved: its precision and number of processes."""
    values = {
        key: str(value) if isinstance(value, list) else value
        for key, value in cfg.values().items()
        if value is not None
    }
    resolved = {"precision": accelerator.mixed_precision}
    return {**values, **resolved, "num_processes": accelerator.num_processes}


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Tracking:
    """The run's trackers, started with its config: metrics.jsonl lines and sample grids go to
    each of them at their step (main process; nothing is read from the device for them).
    `accelerator.end_training()` closes them at the end and after a stop by a signal; a run that
    fails has everything TensorBoard was given on disk (flushed at each call), and W&B's own
    exit hook ends its run with the exit status."""

    def __init__(self, accelerator: Accelerator, cfg: Config, start_step: int) -> None:
        self.accelerator = accelerator
        start_trackers(accelerator)
        config = hyperparameters(cfg, accelerator)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                write_hparams(tracker.writer, config)
            else:
                tracker.store_init_configuration(config)
        self.rewind(start_step)  # a resumed run's steps after its checkpoint are redone

    def rewind(self, step: int) -> None:
        """The run goes on from `step` (a resume, a rollback): TensorBoard hides what the earlier
        pass logged after it (a SessionLog START, as SummaryWriter's purge_step writes). W&B
        takes steps in increasing order only: each start is a new W&B run, and after a rollback
        it keeps the first pass of the replayed steps."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                from tensorboard.compat.proto.event_pb2 import Event, SessionLog

                start = SessionLog(status=SessionLog.START)
                tracker.writer.file_writer.add_event(Event(step=step + 1, session_log=start))
                tracker.writer.flush()

    def log(self, record: dict, section: str) -> None:
        """The numbers of a metrics.jsonl line at its step, as `section`/key: the trackers show
        each section as one group of charts."""
        numbers = {f"{section}/{k}": v for k, v in record.items() if k != "step" and is_number(v)}
        self.accelerator.log(numbers, step=record["step"])

    def log_image(self, name: str, pixels: np.ndarray, step: int) -> None:
        """An image (uint8, HxWx3 or HxW for gray, as saved), at `step`."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                batch = np.atleast_3d(pixels)[None]
                tracker.log_images({name: batch}, step=step, dataformats="NHWC")
                tracker.writer.flush()  # its scalars are flushed as they come: so are images
            else:
                tracker.log_images({name: [pixels]}, step=step)


def start_trackers(accelerator: Accelerator) -> None:
    """Accelerate's init_trackers (main process), with W&B failing to start (not logged in, no
    network) as a one-line error on every process: the others would otherwise wait for the main
    one in the next collective until the launcher or the timeout ended them."""
    wandb_errors: tuple = ()
    if any(isinstance(tracker, WandBTracker) for tracker in accelerator.log_with):
        import wandb

        wandb_errors = (wandb.errors.Error,)
    failure = None
    try:
        accelerator.init_trackers(PROJECT)
    except wandb_errors as err:
        failure = (
            f"W&B could not start ({first_line(err)}): run `wandb login`, or set "
            "WANDB_MODE=offline to keep the run in the run folder's wandb/ for `wandb sync`"
        )
    if accelerator.num_processes > 1:
        failure = broadcast_object_list([failure])[0]
    if failure is not None:
        raise UserError(failure)


def write_hparams(writer, config: dict) -> None:
    """The config as TensorBoard hyperparameters of the run itself. Accelerate's own
    store_init_configuration would write them as another run, in a folder named by the time."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(config, dict.fromkeys(SUMMARY_METRICS, 0.0)):
        writer.file_writer.add_summary(summary)
    writer.flush()
