"""transformers.Trainer with riemannlora optimizers: factory route, plain route, resume, adapters."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

import riemannlora as rl
from riemannlora.integrations.trainer import RiemannTrainer, default_optimizer

torch.set_num_threads(2)

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.1)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tiny_peft_llama():
    return get_peft_model(tiny_llama(), LoraConfig(**LORA))


def token_data(n: int = 48, length: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(n):
        ids = torch.randint(0, 64, (length,), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    return data


def training_args(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=6,
        save_steps=3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=2,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


FACTORIES = {
    "ScaledAdamW": lambda m: rl.ScaledAdamW(m, lr=1e-2, weight_decay=0.01),
    "ScaledSGD-f64-momentum": lambda m: rl.ScaledSGD(
        m, lr=0.1, momentum=0.9, gram_dtype=torch.float64
    ),
}


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def full_run(request, tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp(request.param)
    trainer = RiemannTrainer(
        model=tiny_peft_llama(),
        args=training_args(out),
        train_dataset=token_data(),
        data_collator=default_data_collator,
        optimizer_factory=FACTORIES[request.param],
    )
    trainer.train()
    return request.param, out, trainer


def test_factory_builds_our_optimizer_from_the_unwrapped_model(full_run):
    name, _, trainer = full_run
    inner = trainer.optimizer.optimizer  # Accelerate's wrapper around ours
    assert type(inner).__name__ == name.split("-")[0]
    assert inner.param_groups[0]["lora"] and len(inner.param_groups[0]["scalings"]) == 6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


class _Crash(TrainerCallback):
    """Raises at the start of step ``at`` (after the checkpoint of step ``at - 1``)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at - 1:
            raise RuntimeError("simulated crash")


def test_crash_then_resume_matches_uninterrupted_run_bitwise(full_run, tmp_path):
    name, _, trainer = full_run
    kwargs = dict(
        args=training_args(tmp_path),
        train_dataset=token_data(),
        data_collator=default_data_collator,
        optimizer_factory=FACTORIES[name],
    )
    crashed = RiemannTrainer(model=tiny_peft_llama(), callbacks=[_Crash(at=5)], **kwargs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]
    # a new process: fresh base with the same init; adapters, optimizer.pt (through our
    # validating load_state_dict, read with torch.load(weights_only=True)), scheduler, RNG
    # (LoRA dropout) and the data position all come from the last checkpoint
    resumed = RiemannTrainer(model=tiny_peft_llama(), **kwargs)
    resumed.train(resume_from_checkpoint=True)
    final, again = trainable(trainer.model), trainable(resumed.model)
    assert final.keys() == again.keys()
    for k in final:
        assert torch.equal(final[k], again[k]), k
    # the resumed history holds steps 1-3 from the checkpoint and its own steps 4-6
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses == [h["loss"] for h in resumed.state.log_history if "loss" in h]


def test_saved_adapter_is_a_standard_peft_adapter(full_run, tmp_path):
    _, _, trainer = full_run
    trainer.save_model(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    for name, p in trainer.model.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, loaded.get_parameter(name)), name
    ids = torch.randint(0, 64, (2, 10))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trainer.model(ids).logits)


def test_default_optimizer_reads_training_arguments_and_follows_the_scheduler(tmp_path):
    args = training_args(
        tmp_path, learning_rate=3e-3, adam_beta1=0.8, adam_epsilon=1e-7, save_strategy="no"
    )
    trainer = RiemannTrainer(
        model=tiny_peft_llama(),
        args=args,
        train_dataset=token_data(),
        data_collator=default_data_collator,
    )
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, rl.ScaledAdamW)
    group = opt.param_groups[0]
    assert group["initial_lr"] == 3e-3 and group["betas"] == (0.8, 0.999)
    assert group["eps"] == 1e-7
    # linear warmup over 2 steps, then linear decay to 0 at step 6 (lr logged before each step)
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    expected = [0.0, 1.5e-3, 3e-3, 2.25e-3, 1.5e-3, 0.75e-3]
    assert logged == pytest.approx(expected)


def test_plain_trainer_with_optimizers_tuple(tmp_path):
    model = tiny_peft_llama()
    before = trainable(model)
    opt = rl.ScaledAdamW(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, save_strategy="no", max_steps=3),
        train_dataset=token_data(),
        data_collator=default_data_collator,
        optimizers=(opt, sched),
    )
    trainer.train()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)  # our scheduler, 3 steps
    after = trainable(model)
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


class _PoisonGradient(TrainerCallback):
    """Sets one LoRA gradient to NaN just before the optimizer step of step ``at``."""

    def __init__(self, model, at: int):
        self.param = next(p for n, p in model.named_parameters() if "lora_B" in n)
        self.at = at

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            self.param.grad[0, 0] = float("nan")


def test_nonfinite_step_is_skipped_and_logged(tmp_path):
    model = tiny_peft_llama()
    trainer = RiemannTrainer(
        model=model,
        args=training_args(tmp_path, save_strategy="no", max_steps=4),
        train_dataset=token_data(),
        data_collator=default_data_collator,
        callbacks=[_PoisonGradient(model, at=2)],
    )
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert opt.skipped_steps == 1
    assert all(int(s["step"]) == 3 for s in opt.state.values())  # 4 steps, one skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(h.get("skipped_steps") == 1 for h in trainer.state.log_history)


def test_trainer_bf16_autocast_gradient_accumulation_and_clipping(tmp_path):
    trainer = RiemannTrainer(
        model=tiny_peft_llama(),
        args=training_args(
            tmp_path,
            save_strategy="no",
            max_steps=3,
            bf16=True,
            gradient_accumulation_steps=2,
            max_grad_norm=0.5,
        ),
        train_dataset=token_data(),
        data_collator=default_data_collator,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_factory_misuse_is_reported(tmp_path):
    kwargs = dict(
        model=tiny_peft_llama(),
        args=training_args(tmp_path, save_strategy="no", max_steps=1),
        train_dataset=token_data(),
        data_collator=default_data_collator,
    )
    with pytest.raises(TypeError, match="optimizer_factory must be callable"):
        RiemannTrainer(**kwargs, optimizer_factory="ScaledAdamW")
    with pytest.raises(ValueError, match="do not pass 'optimizers' too"):
        opt = default_optimizer(kwargs["model"], kwargs["args"])
        RiemannTrainer(**kwargs, optimizers=(opt, None))
    trainer = RiemannTrainer(**kwargs, optimizer_factory=lambda m: "not an optimizer")
    with pytest.raises(TypeError, match=r"returned str, not a torch\.optim\.Optimizer"):
        trainer.train()


# ----------------------------------------------------------------------------- real model
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _minilm_trainer(out, data, collate, **kw):
    from peft import TaskType

    from riemannlora.assets import load_sequence_classifier

    torch.manual_seed(0)
    base, _ = load_sequence_classifier(MINILM, num_labels=4)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"]
    )
    return RiemannTrainer(
        model=get_peft_model(base, config),
        args=training_args(out, learning_rate=1e-3, **kw),
        train_dataset=data,
        data_collator=collate,
        optimizer_factory=lambda m: rl.ScaledAdamW(m, lr=1e-3),
    )


@pytest.mark.slow
def test_real_minilm_multiemo_resume_matches_and_adapter_loads(tmp_path):
    from riemannlora.assets import load_sequence_classifier
    from riemannlora.tasks import Collator, load_task

    _, tok = load_sequence_classifier(MINILM, num_labels=4)
    data = load_task("multiemo", tok, "train", n=48, max_length=48)
    collate = Collator.for_tokenizer(tok)
    full = _minilm_trainer(tmp_path / "full", data, collate)
    full.train()
    resumed = _minilm_trainer(tmp_path / "resumed", data, collate)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    a, b = trainable(full.model), trainable(resumed.model)
    for k in a:  # BERT dropout: Trainer restores the RNG, so this is exact too
        assert torch.equal(a[k], b[k]), k
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in losses)
    full.save_model(str(tmp_path / "adapter"))
    base, _ = load_sequence_classifier(MINILM, num_labels=4)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    batch = collate(data[:8])
    full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**batch).logits, full.model(**batch).logits, rtol=1e-5, atol=1e-5
        )
