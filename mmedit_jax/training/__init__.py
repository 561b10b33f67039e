"""Meta-training of the hypernetwork editors (MEND, KE) with EasyEdit's multimodal trainer objective.

`config` (TrainConfig, EasyEdit's keys) -> `trainables` (what the trainer needs of an editor) -> `objective`
(the loss) -> `step` (optimiser, state, the one jitted step) -> `loop` (data order, validation, checkpoints,
`train`). `python -m mmedit_jax.train` is the command-line shell around `build_trainable` and `train`.
"""

from mmedit_jax.training.config import TrainConfig, ke_config_from_hparams
from mmedit_jax.training.loop import TrainResult, Validator, batch_indices, epoch_order, train
from mmedit_jax.training.objective import batch_loss, case_losses, lagrangian_loss
from mmedit_jax.training.step import init_train_state, make_optimizer, make_train_step, step_program, warm_start
from mmedit_jax.training.trainables import Trainable, build_trainable, ke_trainable, load_editor_state, mend_trainable

__all__ = [
    "TrainConfig", "TrainResult", "Trainable", "Validator", "batch_indices", "batch_loss", "build_trainable",
    "case_losses", "epoch_order", "init_train_state", "ke_config_from_hparams", "ke_trainable", "lagrangian_loss",
    "load_editor_state", "make_optimizer", "make_train_step", "mend_trainable", "step_program", "train",
    "warm_start",
]
