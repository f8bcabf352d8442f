"""Locally optimal initialization: first Riemannian gradient, unchanged outputs, pass count."""

from __future__ import annotations

import pytest
import torch

import riemannlora as rl
from riemannlora.core.geometry import riemannian_gradient, tangent_to_dense
from riemannlora.manifold import manifold_layers
from test_manifold import (
    assert_bitwise_equal,
    base_weights,
    dense_gradients,
    lm_loss,
    logits,
    peft_llama,
    peft_mlp,
    token_batch,
)

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def counting(fn):
    calls = []

    def wrapped():
        calls.append(1)
        return fn()

    return wrapped, calls


def test_first_riemannian_gradient_is_best_rank_2r_approximation():
    _, model = peft_llama(r=2, dtype=torch.float64)
    ids = token_batch()
    info = rl.init_loi(
        model,
        lambda: lm_loss(model, ids),
        power_iters=6,
        generator=torch.Generator().manual_seed(0),
    )
    layers = manifold_layers(model)
    assert len(layers) == 4 and all(layer.offset for layer in layers)
    G0 = dense_gradients(model, lambda mdl: lm_loss(mdl, ids))  # at W0 + X0 - X0 = W0
    lm_loss(model, ids).backward()
    for layer in layers:
        r = layer.rank
        U, Q = layer.U().detach(), layer.Q().detach()
        grad = tangent_to_dense(U, Q, *riemannian_gradient(U, layer.GQ(), layer.GtU()))
        u, s, vh = torch.linalg.svd(G0[layer.name], full_matrices=False)
        best = u[:, : 2 * r] @ torch.diag(s[: 2 * r]) @ vh[: 2 * r]
        torch.testing.assert_close(grad, best, atol=1e-9 * s[0].item(), rtol=1e-6)
        torch.testing.assert_close(
            info.singular_values[layer.name].double(), s[: 2 * r], rtol=1e-8, atol=0
        )
        # the point: X0 = alpha U[:, :r] V[:, r:2r]^T with alpha = -0.01/sqrt(r)
        alpha = info.alphas[layer.name]
        assert alpha == pytest.approx(-0.01 / r**0.5)
        # (up to the signs of the singular pairs, which SVD leaves free): column space of
        # u[:, :r], row space of v[:, r:2r], all singular values |alpha|
        Pu, Pv = u[:, :r] @ u[:, :r].T, vh[r : 2 * r].T @ vh[r : 2 * r]
        torch.testing.assert_close(U @ U.T, Pu, atol=1e-8, rtol=0)
        torch.testing.assert_close(Q @ Q.T, Pv, atol=1e-8, rtol=0)
        sx = torch.linalg.svdvals(layer.point().detach())[:r]
        torch.testing.assert_close(sx, torch.full_like(sx, abs(alpha)), atol=1e-12, rtol=0)
        torch.testing.assert_close(layer.U0(), layer.U(), atol=0, rtol=0)
        torch.testing.assert_close(layer.V0(), layer.V(), atol=0, rtol=0)


@pytest.mark.parametrize("power_iters", [0, 1, 3])
def test_outputs_unchanged_and_pass_count(power_iters):
    _, model = peft_llama(r=2)
    ids = token_batch()
    before = logits(model, ids)
    base = base_weights(model)
    loss_fn, calls = counting(lambda: lm_loss(model, ids))
    info = rl.init_loi(model, loss_fn, power_iters=power_iters, oversampling=4)
    assert len(calls) == info.backward_passes == 2 * (power_iters + 1)
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=1e-5)
    assert_bitwise_equal(base, model)
    assert info.sketch_sizes == {
        layer.name: min(2 * layer.rank + 4, layer.m, layer.n) for layer in manifold_layers(model)
    }


def test_modes_restored_no_grads_written_and_custom_alpha():
    _, model = peft_llama(r=2, modules_to_save=["lm_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    head.grad = torch.ones_like(head)
    model.train()
    model.base_model.model.model.layers[1].eval()
    modes = {n: m.training for n, m in model.named_modules() if "lora_" not in n}
    ids = token_batch()
    seen_training = []

    def loss_fn():
        seen_training.append(model.training)
        return lm_loss(model, ids)

    info = rl.init_loi(model, loss_fn, alpha=0.5)
    assert not any(seen_training)  # eval during the passes (no dropout)
    assert {n: m.training for n, m in model.named_modules() if "lora_" not in n} == modes
    assert all(p.grad is None for p in model.parameters() if p is not head)
    assert torch.equal(head.grad, torch.ones_like(head))  # other .grad untouched
    assert trainable == {
        n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n
    }
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    for layer in manifold_layers(model):
        assert info.alphas[layer.name] == 0.5
        expected = "layers.1." not in layer.path  # the factor modules keep their mode
        assert layer.module.lora_A["default"].training == expected
        assert layer.module.lora_B["default"].training == expected
        # |X0| = |alpha| (orthonormal U, V columns times alpha)
        s = torch.linalg.svdvals(layer.point().detach())
        torch.testing.assert_close(
            s[: layer.rank], torch.full((layer.rank,), 0.5), atol=1e-5, rtol=0
        )


def test_failure_restores_adapter():
    _, model = peft_llama(r=2)
    ids = token_batch()
    before = {
        (n, k): (m.lora_A[k], m.lora_B[k], m.scaling[k])
        for n, m in model.named_modules()
        if hasattr(m, "lora_A")
        for k in m.lora_A
    }
    out = logits(model, ids)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return lm_loss(model, ids)

    with pytest.raises(KeyboardInterrupt):
        rl.init_loi(model, flaky)
    for (n, k), (a, b, s) in before.items():
        m = model.get_submodule(n)
        assert m.lora_A[k] is a and m.lora_B[k] is b and m.scaling[k] == s
    torch.testing.assert_close(logits(model, ids), out, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("loss", "exc", "match"),
    [
        (lambda model, ids: model(input_ids=ids).logits, ValueError, "scalar loss"),
        (lambda model, ids: lm_loss(model, ids) * float("nan"), ValueError, "non-finite"),
        (lambda model, ids: 1.0, TypeError, "scalar torch.Tensor"),
        (lambda model, ids: lm_loss(model, ids).detach(), ValueError, "torch.no_grad"),
    ],
)
def test_compute_loss_validation(loss, exc, match):
    _, model = peft_llama(r=2)
    ids = token_batch()
    with pytest.raises(exc, match=match):
        rl.init_loi(model, lambda: loss(model, ids))


def test_argument_errors():
    _, model = peft_llama(r=2)
    ids = token_batch()
    fn = lambda: lm_loss(model, ids)  # noqa: E731
    with pytest.raises(ValueError, match="alpha must be finite and nonzero"):
        rl.init_loi(model, fn, alpha=0.0)
    with pytest.raises(ValueError, match="oversampling must be an integer >= 0, got -1"):
        rl.init_loi(model, fn, oversampling=-1)
    with pytest.raises(TypeError, match="callable"):
        rl.init_loi(model, lm_loss(model, ids))
    _, model = peft_mlp(r=7)  # fc4 is 7 x 12: 2r = 14 > 7
    with pytest.raises(ValueError, match=r"2r <= min\(out, in\)"):
        rl.init_loi(model, lambda: model(torch.zeros(2, 10, dtype=torch.float64)).sum())
