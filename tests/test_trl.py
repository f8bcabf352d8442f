"""TRL's SFTTrainer with riemannlora optimizers on a real model and real data (SmolLM2-135M,
E2E NLG prompt/completion pairs): LOI from a TRL batch, clipping by the Riemannian norm, exact
resume, a standard adapter out; and the warning a plain SFTTrainer earns."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer  # a dev dependency (pyproject [trl])

import riemannlora as rl
import riemannlora.integrations.trainer as integration
from riemannlora.integrations.trainer import init_loi_from_trainer
from riemannlora.integrations.trl import RiemannSFTTrainer
from riemannlora.manifold import manifold_layers

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]
torch.set_num_threads(2)


def base_model():
    from riemannlora.bench.assets import SMOLLM2_ID, load_causal_lm

    torch.manual_seed(0)
    return load_causal_lm(SMOLLM2_ID)


def peft_model():
    model, tok = base_model()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, config), tok


def e2e_pairs(n: int = 16):
    from riemannlora.bench.tasks import task_data

    train = task_data("e2e").to_datasets()["train"]
    return train.select(range(n)).remove_columns([c for c in train.column_names if c == "mr"])


def sft_args(out, **kw) -> SFTConfig:
    base = dict(
        output_dir=str(out),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        max_length=64,
        bf16=False,  # bitwise resume is checked in float32
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return SFTConfig(**base)


def riemannion(model):
    return rl.Riemannion(model, lr=1e-3, momentum=0.9)


def make_trainer(out, callbacks=()):
    model, tok = peft_model()
    return RiemannSFTTrainer(
        model=model,
        args=sft_args(out),
        train_dataset=e2e_pairs(),
        processing_class=tok,
        optimizer_factory=riemannion,
        callbacks=list(callbacks),
    )


class _Crash(TrainerCallback):
    def __init__(self, at: int):
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at - 1:
            raise RuntimeError("simulated crash")


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_sft_trainer_with_loi_clips_riemannian_norm_resumes_exactly_and_exports(
    tmp_path, monkeypatch
):
    clips = []
    real_clip = integration.clip_grad_norm_
    monkeypatch.setattr(
        integration, "clip_grad_norm_", lambda opt, norm: clips.append(norm) or real_clip(opt, norm)
    )
    batch_ids = None

    # uninterrupted run, LOI from TRL's first batch and TRL's own loss
    trainer = make_trainer(tmp_path / "full")
    model = trainer.model
    batch = integration.first_batch(trainer)
    batch_ids = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        before = model(**batch_ids).logits
    info = init_loi_from_trainer(trainer, generator=torch.Generator().manual_seed(0))
    assert info.backward_passes == 4 and all(layer.offset for layer in manifold_layers(model))
    with torch.no_grad():  # LOI leaves the outputs as they were
        torch.testing.assert_close(model(**batch_ids).logits, before, atol=2e-4, rtol=1e-4)
    assert not any(trainer._metrics[m] for m in trainer._metrics)  # no metric of the passes
    trainer.train()
    full = trainable(trainer.model)
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logged) == 4 and all(torch.isfinite(torch.tensor(logged)))
    assert 1.0 in clips  # max_grad_norm=1.0 (TRL's default) went to the Riemannian clipping

    # crash after the checkpoint of step 2, resume in a fresh trainer and model: bit for bit
    crashing = make_trainer(tmp_path / "crash", callbacks=[_Crash(at=3)])
    init_loi_from_trainer(crashing, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    resumed = make_trainer(tmp_path / "crash")
    resumed.train(resume_from_checkpoint=str(tmp_path / "crash" / "checkpoint-2"))
    got = trainable(resumed.model)
    assert full.keys() == got.keys()
    assert all(torch.equal(full[k], got[k]) for k in full), [
        k for k in full if not torch.equal(full[k], got[k])
    ][:3]

    # the saved model is a standard PEFT adapter that vanilla PEFT loads onto the base
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(base_model()[0], str(tmp_path / "adapter")).eval()
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**batch_ids).logits, trainer.model(**batch_ids).logits, atol=2e-4, rtol=1e-4
        )


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_plain_sft_trainer_with_a_manifold_optimizer_warns_when_it_clips(tmp_path, max_grad_norm):
    model, tok = peft_model()
    opt = riemannion(model)
    trainer = SFTTrainer(
        model=model,
        args=sft_args(tmp_path, max_steps=2, save_steps=100, max_grad_norm=max_grad_norm),
        train_dataset=e2e_pairs(4),
        processing_class=tok,
        optimizers=(opt, None),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [str(w.message) for w in caught if "the wrong norm for Riemannion" in str(w.message)]
    if max_grad_norm:
        assert len(ours) == 1 and "\n" not in ours[0]  # once, on one line
        assert "SFTTrainer clips gradients by their Euclidean norm (max_grad_norm=1.0)" in ours[0]
        assert "RiemannSFTTrainer" in ours[0]
    else:
        assert not ours
