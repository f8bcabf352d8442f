"""transformers.Trainer with riemannlora optimizers (the scaled ones and the manifold ones,
Riemannion / RiemannianSGD): factory route, plain route, resume, LOI, clipping, adapters."""

from __future__ import annotations

import json
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
from riemannlora.integrations.trainer import RiemannTrainer, default_optimizer, first_batch

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
    # the manifold optimizers convert the model when Trainer creates them
    "Riemannion": lambda m: rl.Riemannion(
        m, lr=1e-2, weight_decay=0.01, generator=torch.Generator().manual_seed(0)
    ),
    "RiemannianSGD": lambda m: rl.RiemannianSGD(
        m, lr=0.5, generator=torch.Generator().manual_seed(0)
    ),
}


def is_manifold(name: str) -> bool:
    return name.startswith("Riemann")


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
    group = inner.param_groups[0]
    if is_manifold(name):
        assert group["manifold"] and len(group["layer_names"]) == 6
    else:
        assert group["lora"] and len(group["scalings"]) == 6
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
    name, _, trainer = full_run
    trainer.save_model(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))  # vanilla PEFT
    if not is_manifold(name):  # (manifold form: other layout, the same function below)
        for key, p in trainer.model.named_parameters():
            if "lora_" in key:
                assert torch.equal(p, loaded.get_parameter(key)), key
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


class _Measure(TrainerCallback):
    """Records the Riemannian gradient norm just before each optimizer step (after clipping)."""

    def __init__(self):
        self.trainer = None
        self.norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.norms.append(float(rl.clip_grad_norm_(self.trainer.optimizer, float("inf"))))


def _manifold_trainer(out, factory="Riemannion", callbacks=(), loi=False, **kw):
    model = tiny_peft_llama()
    trainer = RiemannTrainer(
        model=model,
        args=training_args(out, **kw),
        train_dataset=token_data(),
        data_collator=default_data_collator,
        optimizer_factory=FACTORIES[factory],
        callbacks=list(callbacks),
    )
    if loi:  # LOI from a Trainer batch, before the optimizer exists
        batch = first_batch(trainer)
        rl.init_loi(
            model,
            lambda: trainer.compute_loss(model, batch),
            generator=torch.Generator().manual_seed(0),
        )
    return trainer


def test_loi_from_a_trainer_batch_then_crash_resume_and_export(tmp_path):
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        pretrained = tiny_llama()(ids).logits
    full = _manifold_trainer(tmp_path / "full", loi=True)
    model = full.model
    model.eval()
    with torch.no_grad():  # LOI keeps the outputs: the pretrained model's
        torch.testing.assert_close(model(ids).logits, pretrained)
    full.train()
    info = json.loads((tmp_path / "full" / "checkpoint-3" / "riemannlora.json").read_text())
    assert len(info["layers"]) == 6 and all(v["offset"] for v in info["layers"].values())

    crashed = _manifold_trainer(tmp_path / "run", loi=True, callbacks=[_Crash(at=5)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    # a new process runs the same script (LOI again), then resumes from checkpoint-3: the
    # checkpoint's adapter, row bases and offsets replace the LOI result bit for bit
    resumed = _manifold_trainer(tmp_path / "run", loi=True)
    resumed.train(resume_from_checkpoint=True)
    final, again = trainable(full.model), trainable(resumed.model)
    for k in final:
        assert torch.equal(final[k], again[k]), k

    full.save_model(str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {8}  # rank 2r: [U | U0], [V | -V0]^T
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, full.model(ids).logits)


def _plain_manifold_trainer(out, callbacks=()):
    model = tiny_peft_llama()
    opt = rl.RiemannianSGD(model, lr=0.5, generator=torch.Generator().manual_seed(0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    return Trainer(
        model=model,
        args=training_args(out, max_grad_norm=0.0),  # Trainer's own clipping: Euclidean
        train_dataset=token_data(),
        data_collator=default_data_collator,
        optimizers=(opt, sched),
        callbacks=list(callbacks),
    )


def test_plain_trainer_route_with_a_manifold_optimizer_resumes_bitwise(tmp_path):
    full = _plain_manifold_trainer(tmp_path / "full")
    full.train()
    crashed = _plain_manifold_trainer(tmp_path / "run", callbacks=[_Crash(at=5)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    # the optimizer converted the fresh model, whose redirected load_adapter reads the checkpoint
    resumed = _plain_manifold_trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    final, again = trainable(full.model), trainable(resumed.model)
    assert final.keys() == again.keys()
    for k in final:
        assert torch.equal(final[k], again[k]), k
    full.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    ids = torch.randint(0, 64, (2, 10))
    full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, full.model(ids).logits)


@pytest.mark.parametrize("factory", ["Riemannion", "RiemannianSGD"])
def test_max_grad_norm_clips_the_riemannian_gradient(tmp_path, factory):
    logged = {}
    for max_norm in (0.0, 0.05):
        measure = _Measure()
        trainer = _manifold_trainer(
            tmp_path / str(max_norm),
            factory,
            callbacks=[measure],
            save_strategy="no",
            max_steps=3,
            max_grad_norm=max_norm,
        )
        measure.trainer = trainer
        trainer.train()
        logged[max_norm] = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        if max_norm == 0.0:  # the logged norm is the Riemannian gradient's
            assert logged[max_norm] == pytest.approx(measure.norms, rel=1e-6)
        else:  # clipped to exactly max_norm by that norm
            assert all(n > max_norm for n in logged[max_norm])
            assert measure.norms == pytest.approx([max_norm] * 3, rel=1e-5)


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


@pytest.mark.parametrize("factory", [None, "Riemannion"])
def test_trainer_bf16_autocast_gradient_accumulation_and_clipping(tmp_path, factory):
    trainer = RiemannTrainer(
        model=tiny_peft_llama(),
        optimizer_factory=None if factory is None else FACTORIES[factory],
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


def _num_labels() -> int:
    from riemannlora.bench.tasks import task_data

    return len(task_data("clinc150").labels)  # CLINC150's 150 intents


def _minilm_trainer(out, data, collate, **kw):
    from peft import TaskType

    from riemannlora.bench.assets import load_sequence_classifier

    torch.manual_seed(0)
    base, _ = load_sequence_classifier(MINILM, num_labels=_num_labels())
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
def test_real_minilm_clinc150_resume_matches_and_adapter_loads(tmp_path):
    from riemannlora.bench.assets import load_sequence_classifier
    from riemannlora.bench.tasks import Collator, load_task

    _, tok = load_sequence_classifier(MINILM, num_labels=_num_labels())
    data = load_task("clinc150", tok, "train", n=48, max_length=48)
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
    base, _ = load_sequence_classifier(MINILM, num_labels=_num_labels())
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    batch = collate(data[:8])
    full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**batch).logits, full.model(**batch).logits, rtol=1e-5, atol=1e-5
        )
