"""Training, one module per stage:

* :mod:`~gpd_ds.train.step`: one micro-step (forwards, loss, backward, ``engine.step``) and the non-finite watch;
* :mod:`~gpd_ds.train.components`: the run's parts, each built from its own config section;
* :mod:`~gpd_ds.train.state`: what outlives a restart, as stateful components;
* :mod:`~gpd_ds.train.checkpointer`: saving and restoring the engine with that state;
* :mod:`~gpd_ds.train.evaluation`: evaluation and the best weights;
* :mod:`~gpd_ds.train.loop`: :func:`train` and the step loop (:class:`Trainer`);
* :mod:`~gpd_ds.train.entry`: the command-line entry (after :mod:`gpd_ds.train_cli` has checked the arguments).
"""

from gpd_ds.train.loop import RunResult, Trainer, train
from gpd_ds.train.step import NonFiniteLossError, kd_warmup, train_step

__all__ = ["NonFiniteLossError", "RunResult", "Trainer", "kd_warmup", "train", "train_step"]
