"""riemannlora.clip_grad_norm_: the norm of the Riemannian gradient (plus the other trainable
parameters' gradients), checked against a dense float64 projection, and clipping that scales
the step as a scaled loss would."""

from __future__ import annotations

import copy

import pytest
import torch

import riemannlora as rl
from riemannlora.manifold import manifold_layers
from test_manifold import dense_gradients, mlp_data, mlp_loss, peft_mlp

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def proj(U, Q, Z):
    """P_X(Z) = U U^T Z + (I - U U^T) Z Q Q^T (dense)."""
    P = U @ U.T
    return P @ Z + (Z - P @ Z) @ Q @ Q.T


def converted(opt_cls=rl.Riemannion, use_loi=False, **kw):
    """A float64 PEFT MLP in manifold form with one more trainable parameter (a bias)."""
    _, model = peft_mlp(init=False)
    data = mlp_data()
    if use_loi:
        rl.init_loi(
            model, lambda: mlp_loss(model, data), generator=torch.Generator().manual_seed(0)
        )
    model.base_model.model.fc1.base_layer.bias.requires_grad_(True)
    opt = opt_cls(model, lr=kw.pop("lr", 0.05), generator=torch.Generator().manual_seed(0), **kw)
    return model, opt, data


@pytest.mark.parametrize("use_loi", [False, True])
def test_norm_is_the_riemannian_gradient_norm(use_loi):
    model, opt, data = converted(use_loi=use_loi)
    G = dense_gradients(model, lambda m: mlp_loss(m, data))
    opt.zero_grad()
    mlp_loss(model, data).backward()
    bias = model.base_model.model.fc1.base_layer.bias
    expected = bias.grad.square().sum()
    for layer in manifold_layers(model):
        with torch.no_grad():
            expected = expected + proj(layer.U(), layer.Q(), G[layer.name]).square().sum()
    expected = expected.sqrt()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for target in (opt, model):
        norm = rl.clip_grad_norm_(target, float("inf"))
        torch.testing.assert_close(norm, expected, rtol=1e-12, atol=0)
    # measuring only leaves the gradients alone
    assert all(
        torch.equal(a, p.grad)
        for a, p in zip(grads, [p for p in model.parameters() if p.grad is not None])
    )
    # torch's norm over the converted model counts blocks the optimizer ignores
    euclid = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert abs(float(euclid) - float(expected)) > 1e-3 * float(expected)


@pytest.mark.parametrize("opt_cls", [rl.Riemannion, rl.RiemannianSGD])
def test_clipping_scales_the_step_like_a_scaled_loss(opt_cls):
    model, opt, data = converted(opt_cls)
    twin, opt2 = copy.deepcopy(model), None
    opt2 = opt_cls(twin, lr=0.05)
    opt2.load_state_dict(opt.state_dict())
    for step in range(3):
        opt.zero_grad()
        mlp_loss(model, data).backward()
        norm = rl.clip_grad_norm_(opt, 0.1)
        after = rl.clip_grad_norm_(opt, float("inf"))
        coef = min(1.0, 0.1 / (float(norm) + 1e-6))
        assert coef < 1.0  # really clipped
        torch.testing.assert_close(float(after), float(norm) * coef, rtol=1e-12, atol=0)
        opt.step()
        # independent: the same step from the loss scaled by the clipping factor
        opt2.zero_grad()
        (coef * mlp_loss(twin, data)).backward()
        opt2.step()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=f"{name} at step {step}")


def test_other_optimizers_get_torchs_norm_and_errors():
    _, model = peft_mlp(init=False)
    data = mlp_data()
    opt = rl.ScaledAdamW(model, lr=1e-3)
    mlp_loss(model, data).backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    torch.testing.assert_close(rl.clip_grad_norm_(opt, float("inf")), expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="max_norm"):
        rl.clip_grad_norm_(opt, -1.0)
    with pytest.raises(TypeError, match=r"model \(nn\.Module\) or an optimizer"):
        rl.clip_grad_norm_("opt", 1.0)
    params[0].grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        rl.clip_grad_norm_(opt, 1.0, error_if_nonfinite=True)
