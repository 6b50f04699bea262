"""How long `teacher train` (and so a `run` that finds no teacher) takes here: the estimate its notice
prints, from the first timed steps of the dataset's recipe, without finishing the training.

Usage: .venv/bin/python benchmarks/teacher_cost.py [ARCH] [DATASET]   (default: resnet34 fashion-mnist)
"""

from __future__ import annotations

import sys
import tempfile
import time

from dfkd_bench.data import get_dataset
from dfkd_bench.teachers import TrainProgress, default_train_config, train_teacher


class _Measured(Exception):
    """Stops the training once the estimate is known."""


class _StopAtEstimate(TrainProgress):
    def start(self, start_epoch: int, done_steps: int, total_steps: int) -> None:
        self.total_steps = total_steps
        self.started = time.perf_counter()

    def estimate(self, seconds: float, timed_steps: int) -> None:
        self.seconds, self.timed_steps = seconds, timed_steps
        raise _Measured


def main(arch: str, dataset: str) -> None:
    cfg = default_train_config(dataset)
    progress = _StopAtEstimate()
    with tempfile.TemporaryDirectory() as store:
        try:
            train_teacher(get_dataset(dataset), arch, cfg, store, progress=progress)
        except _Measured:
            pass
    print(f"{arch} on {dataset}: {cfg.epochs} epochs x {progress.total_steps // cfg.epochs} steps of batch "
          f"{cfg.batch_size}; estimate {progress.seconds / 60:.1f} min "
          f"({progress.seconds / progress.total_steps:.2f} s per step with evaluation, "
          f"from {progress.timed_steps} timed steps)")


if __name__ == "__main__":
    main(*(sys.argv[1:3] + ["resnet34", "fashion-mnist"][len(sys.argv[1:3]):]))
