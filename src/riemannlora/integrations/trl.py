"""TRL's ``SFTTrainer`` with riemannlora optimizers.

:class:`RiemannSFTTrainer` is ``trl.SFTTrainer`` with :class:`~riemannlora.integrations.trainer.RiemannTrainerMixin`:
the optimizer is built by ``optimizer_factory`` from the unwrapped model, ``max_grad_norm``
(TRL's default 1.0) clips the Riemannian gradient's norm for Riemannion / RiemannianSGD (a plain
``SFTTrainer`` clips the Euclidean norm of every gradient block of the converted layers), and
checkpoints resume bit for bit::

    import riemannlora
    from trl import SFTConfig
    from riemannlora.integrations.trainer import init_loi_from_trainer
    from riemannlora.integrations.trl import RiemannSFTTrainer

    trainer = RiemannSFTTrainer(
        model=peft_model,
        args=SFTConfig(output_dir="out", learning_rate=1e-3, bf16=False),
        train_dataset=dataset,               # e.g. "prompt" / "completion" columns
        processing_class=tokenizer,
        optimizer_factory=lambda m: riemannlora.Riemannion(m, lr=1e-3),
    )
    init_loi_from_trainer(trainer)           # optional: LOI from a TRL batch and TRL's loss
    trainer.train()                          # later: trainer.train(resume_from_checkpoint=True)
    trainer.save_model()                     # a standard PEFT adapter

``SFTConfig`` turns ``bf16`` on by default: the LoRA factors then train in float32 under bf16
autocast, as with AdamW.
"""

from __future__ import annotations

from trl import SFTTrainer

from riemannlora.integrations.trainer import RiemannTrainerMixin

__all__ = ["RiemannSFTTrainer"]


class RiemannSFTTrainer(RiemannTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` that trains with a riemannlora optimizer (see the module docstring).

    Args:
        *args, **kwargs: as ``trl.SFTTrainer`` (except ``optimizers`` /
            ``optimizer_cls_and_kwargs``).
        optimizer_factory: ``model -> optimizer``, called once with the unwrapped model;
            default: ``ScaledAdamW`` from the ``SFTConfig``
            (:func:`riemannlora.integrations.trainer.default_optimizer`).
    """
