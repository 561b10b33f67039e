"""The trainer's hyperparameters under EasyEdit's hparams keys: `TrainConfig`, and KE's editor sizes from the same
YAML (`ke_config_from_hparams`; MEND's are `mend_net.MendConfig.from_hparams`).

Counting follows the reference: `max_iters`, `val_interval`, `log_interval`, `accumulate_bs` and
`early_stop_patience` count steps (the reference's iterations, one batch of `batch_size` edits each; its batch
size is 1). EasyEdit's BLIP-2 MEND yaml (batch 1, accumulate 2) therefore runs the same schedule;
`batch_size: 2, accumulate_bs: 1` averages the same number of edits per update in one compiled step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from mmedit_jax.editors import ke_net as KN


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Trainer hyperparameters under EasyEdit's names (`hparams/TRAINING/MEND/blip2.yaml` defaults).

    Editor-specific keys (MEND: rank, n_hidden, mlp_class, combine, norm, shared, edit_lr, descent, ...;
    KE: lstm_hidden, condition_dim, hidden_dim, max_scale) are read by `MendConfig.from_hparams` /
    `ke_config_from_hparams` from the same YAML. Frozen and hashable: compiled programs are cached per config.
    """

    alg: str = "MEND"  # MEND, KE or SERAC
    inner_params: tuple[str, ...] = ()  # EasyEdit parameter names or our sites
    lr: float = 1e-6
    lr_lr: float | None = 1e-4
    cedit: float = 0.1
    iedit: float = 0.1
    cloc: float = 1.0
    # Our addition (0 = the reference's objective): weight of `losses.topk_rank_loss` on both locality inputs,
    # which protects the rank order M-Locality measures; `rank_k` tokens per position.
    crank: float = 0.0
    rank_k: int = 11
    batch_size: int = 1  # edits per step (vmapped)
    val_batch_size: int = 1
    accumulate_bs: int = 2  # steps per optimiser update
    grad_clip: float = 100.0
    max_iters: int = 30000
    val_interval: int = 5000
    val_steps: int = 500  # validation cases
    log_interval: int = 200
    early_stop_patience: int = 20000
    early_stop_key: str = "loss/total_edit_val"  # or a validation metric ("val/mean", ...), then higher is better
    exact_match: bool = True
    seed: int = 0
    ckpt_interval: int = 1000  # steps between periodic checkpoints (also saved at every validation and the end)
    max_to_keep: int = 2
    # "mend": the multimodal trainer's weighted sum (EasyEdit; also what the EFK/KE ports train with).
    # "lagrangian": KE's original constrained objective, CR + alpha * (KL - margin) with alpha >= 0 ascended.
    objective: str = "mend"
    margin_kl: float = 1e-3  # the original's BART values: 1e-3 shrinking to 1e-5
    margin_kl_min: float = 1e-5
    lr_alpha: float = 0.1  # centered RMSprop on the multiplier, as the original
    # SERAC: `supervised: true` trains with the SERAC paper's objective (`objective.serac_supervised_loss`:
    # cedit * counterfactual NLL given the gold memory slot + cloc * balanced BCE of the scope classifier) and
    # routes hard (`s* > 0.5`) unless `soft_weighting`; false (EasyEdit's every config): this trainer's objective
    # through the soft mixture.
    supervised: bool = False

    def __post_init__(self):
        if self.alg.upper() not in ("MEND", "KE", "SERAC"):
            raise ValueError(f"TrainConfig.alg={self.alg!r}: expected MEND, KE or SERAC")
        for f in ("batch_size", "val_batch_size", "accumulate_bs", "max_iters", "val_interval", "log_interval",
                  "ckpt_interval"):
            if getattr(self, f) < 1:
                raise ValueError(f"TrainConfig.{f}={getattr(self, f)} must be >= 1")
        if self.objective not in ("mend", "lagrangian"):
            raise ValueError(f"TrainConfig.objective={self.objective!r}: expected 'mend' or 'lagrangian'")
        if not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip={self.grad_clip} must be > 0")

    @classmethod
    def from_hparams(cls, hparams: Mapping, **overrides) -> TrainConfig:
        """Picks this config's keys out of an EasyEdit hparams dict; other keys are left to the editor configs
        (unknown keys such as `model_name`, `device`, `results_dir` are ignored, as EasyEdit's dataclasses do).
        `overrides` that are None are ignored (unset command-line flags)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in hparams.items() if k in names}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        if "inner_params" in kw:
            kw["inner_params"] = tuple(kw["inner_params"])
        if "alg" not in kw and "alg_name" in hparams:
            kw["alg"] = hparams["alg_name"]
        for k in ("lr", "cedit", "iedit", "cloc", "crank", "grad_clip", "margin_kl", "margin_kl_min", "lr_alpha"):
            if k in kw:
                kw[k] = float(kw[k])
        if kw.get("lr_lr") is not None:
            kw["lr_lr"] = float(kw["lr_lr"])
        return cls(**kw)

    def as_json(self) -> dict:
        """The config as JSON-ready values (tuples as lists), as checkpoints and `train_config.json` record it."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def ke_config_from_hparams(hparams: Mapping) -> KN.KEConfig:
    """KE's sizes (`lstm_hidden`, `condition_dim`, `hidden_dim`, `max_scale`, ...) from an EasyEdit hparams dict."""
    names = {f.name for f in dataclasses.fields(KN.KEConfig)}
    return KN.KEConfig(**{k: v for k, v in hparams.items() if k in names})
