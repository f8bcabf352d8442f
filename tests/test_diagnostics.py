"""Diagnostics (riemannlora.diagnostics) against dense formulas, and the Trainer callback."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import default_data_collator

import riemannlora as rl
from riemannlora.diagnostics import DiagnosticsCallback, diagnostics, snapshot
from riemannlora.integrations.trainer import RiemannTrainer
from riemannlora.manifold import manifold_layers
from test_manifold import lm_loss, peft_llama, token_batch
from test_trainer import tiny_peft_llama, token_data, training_args

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def dense_deltas(model, manifold: bool) -> dict[str, torch.Tensor]:
    if manifold:
        return {layer.name: layer.delta().detach().double() for layer in manifold_layers(model)}
    out = {}
    for pair in rl.find_lora_pairs(model):
        out[pair.name] = pair.scaling * (pair.b.detach() @ pair.a.detach()).double()
    return out


def check_layer(entry: dict, delta: torch.Tensor, old: torch.Tensor) -> None:
    s = torch.linalg.svdvals(delta)
    assert entry["delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-9, abs=1e-12)
    assert entry["stable_rank"] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-7)
    assert entry["step_size"] == pytest.approx(float((delta - old).norm()), rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("use_loi", [False, True])
@pytest.mark.parametrize("opt_name", ["Riemannion", "RiemannianSGD"])
def test_manifold_diagnostics_match_dense_formulas(opt_name, use_loi):
    _, model = peft_llama(r=2, dtype=torch.float64)
    ids = token_batch()
    if use_loi:
        rl.init_loi(model, lambda: lm_loss(model, ids), generator=torch.Generator().manual_seed(0))
    opt = getattr(rl, opt_name)(model, lr=0.05, generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # a step first, so that every delta is non-zero
        lm_loss(model, ids).backward()
        before_dense = dense_deltas(model, True)
        before = snapshot(opt)
        expected_norm = float(rl.clip_grad_norm_(opt, float("inf")))
        opt.step()
        opt.zero_grad()
    out = diagnostics(opt, before)
    assert out["grad_norm"] == pytest.approx(expected_norm, rel=1e-12)
    after = dense_deltas(model, True)
    assert out["layers"].keys() == after.keys()
    for name, entry in out["layers"].items():
        check_layer(entry, after[name], before_dense[name])
        assert 1.0 - 1e-9 <= entry["stable_rank"] <= (4 if use_loi else 2) + 1e-9
    steps = [e["step_size"] for e in out["layers"].values()]
    assert out["step_size_max"] == max(steps) and out["step_size_min"] == min(steps)
    assert out["skipped_steps"] == 0 and "gram_cond_a_max" not in out


def test_scaled_diagnostics_match_dense_formulas_with_gram_conditions():
    _, model = peft_llama(r=3, dtype=torch.float64)
    ids = token_batch()
    opt = rl.ScaledAdamW(model, lr=0.01, reg=1e-6)
    for _ in range(2):
        lm_loss(model, ids).backward()
        before_dense = dense_deltas(model, False)
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        expected_norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))
        before = snapshot(opt)
        opt.step()
        opt.zero_grad()
    out = diagnostics(opt, before)
    assert out["grad_norm"] == pytest.approx(expected_norm, rel=1e-10)
    after = dense_deltas(model, False)
    pairs = {p.name: p for p in rl.find_lora_pairs(model)}
    for name, entry in out["layers"].items():
        check_layer(entry, after[name], before_dense[name])
        p = pairs[name]
        eye = torch.eye(p.rank, dtype=torch.float64)
        gram_b = p.scaling**2 * p.b.detach().mT @ p.b.detach() + 1e-6 * eye
        gram_a = p.a.detach() @ p.a.detach().mT + 1e-6 * eye
        assert entry["gram_cond_b"] == pytest.approx(float(torch.linalg.cond(gram_b)), rel=1e-6)
        assert entry["gram_cond_a"] == pytest.approx(float(torch.linalg.cond(gram_a)), rel=1e-6)


def test_callback_logs_through_riemann_trainer_and_writes_jsonl(tmp_path):
    callback = DiagnosticsCallback(every=2, path=tmp_path / "diag.jsonl")
    trainer = RiemannTrainer(
        model=tiny_peft_llama(),
        args=training_args(tmp_path, max_steps=4, save_steps=100),
        train_dataset=token_data(),
        data_collator=default_data_collator,
        optimizer_factory=lambda m: rl.Riemannion(m, lr=1e-2),
        callbacks=[callback],
    )
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "diag.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4]
    assert all(len(r["layers"]) == 6 and r["grad_norm"] > 0 for r in records)
    logged = [h for h in trainer.state.log_history if "riemannlora/step_size_max" in h]
    assert [h["step"] for h in logged] == [1, 2, 4]
    # the logged grad norm is the Riemannian one the Trainer logs as grad_norm too
    for h in logged:
        assert h["riemannlora/grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-5)
    with pytest.raises(ValueError, match="every"):
        DiagnosticsCallback(every=0)
