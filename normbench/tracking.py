"""Optional export of every run's per-epoch metrics to TensorBoard.

Off by default. With ``tensorboard=true`` each run writes TensorBoard event files into
``<run folder>/tensorboard/`` as each epoch ends, one scalar per metric with the epoch as the step,
so ``tensorboard --logdir results/NAME`` shows every run of an experiment side by side, live.
It needs the ``tensorboard`` package: ``pip install 'normbench[tensorboard]'``.

The event files are a copy for viewing: ``metrics.csv`` stays the record that reports are built
from. A run resumed from its checkpoint starts a new event file that tells TensorBoard to drop
anything logged at or after the resumed epoch, so a kill between a checkpoint and its epoch's
events leaves neither a gap nor a duplicate.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from normbench.errors import UserError

FOLDER = "tensorboard"

# EpochRecord field -> TensorBoard tag; grouped so that TensorBoard shows losses and accuracies together.
TAGS = {
    "train_loss": "loss/train", "test_loss": "loss/test",
    "train_acc": "accuracy/train", "test_acc": "accuracy/test",
    "test_acc_batch_stats": "accuracy/test_batch_stats", "test_acc_precise": "accuracy/test_precise",
    "lr": "lr", "samples_per_s": "speed/samples_per_s",
}


def require() -> None:
    """Refuse ``tensorboard=true`` in one line when the extra is not installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError("tensorboard=true needs the tensorboard package: pip install 'normbench[tensorboard]'"
                        ) from None


class TensorBoardLog:
    """Writes each finished epoch's metrics (an EpochRecord) as scalars; NaN values are left out."""

    def __init__(self, folder: Path, first_epoch: int = 1):
        require()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, anything an earlier process logged from this epoch on is discarded
        self.writer = SummaryWriter(log_dir=str(folder / FOLDER), purge_step=first_epoch if first_epoch > 1 else None)

    def epoch(self, record) -> None:
        values = asdict(record)
        for field, tag in TAGS.items():
            value = values.get(field)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, global_step=record.epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
