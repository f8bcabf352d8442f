r"""Scaled (Riemannian-preconditioned) SGD and AdamW for LoRA.

Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models", ICML 2024.
Each LoRA factor's gradient is multiplied by the inverse r x r Gram matrix of the other factor
(:func:`riemannlora.core.preconditioner.precondition_pairs`); the result then goes through the
unchanged update rule of ``torch.optim.SGD`` / ``torch.optim.AdamW`` (the same functional
kernels), so every parameter that is not a LoRA factor is updated bitwise as torch does it, and
the optimizer state is exactly torch's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from riemannlora.distributed import local, precondition_local, wrap_like
from riemannlora.manifold.holders import track
from riemannlora.optim.functional import adamw_from_group
from riemannlora.optim.guard import NonFiniteGuard
from riemannlora.optim.validation import (
    check_betas,
    check_group_hyperparameters,
    check_lora_pair,
    check_number,
    check_state_dict,
    run_closure,
)
from riemannlora.pairs import LoraPair, LoraParams, as_lora_params

__all__ = ["DEFAULT_REG", "DEFAULT_SCALE_AWARE", "ScaledAdamW", "ScaledSGD"]

#: Default damping of the Gram matrices (see README, "Choosing the defaults").
DEFAULT_REG = 1e-6
#: Default convention: precondition with the effective factor ``s * B``.
DEFAULT_SCALE_AWARE = True


def _lora_groups(params: LoraParams, extra: dict[str, Any]) -> list[dict[str, Any]]:
    if not params.pairs:
        raise ValueError(
            "no trainable LoRA pairs found: the model has no LoRA layer with trainable "
            "lora_A/lora_B (apply peft.get_peft_model(model, LoraConfig(...)) first, check that "
            "the adapter is active and trainable, or declare pairs with riemannlora.LoraPair)"
        )
    lora = {
        "params": [p for pair in params.pairs for p in (pair.a, pair.b)],
        "lora": True,
        "scalings": [pair.scaling for pair in params.pairs],
        "pair_names": [pair.name for pair in params.pairs],
        **extra,
    }
    for p in lora["params"]:
        if not p.requires_grad:
            raise ValueError("a LoRA factor does not require grad; unfreeze it or drop its pair")
    groups = [lora]
    if params.others:
        groups.append({"params": list(params.others), "lora": False, **extra})
    return groups


class _ScaledMixin(NonFiniteGuard):
    """Shared plumbing: pairing metadata in param groups, the guarded step, safe state loading.

    ``step()`` computes every LoRA direction ``D`` first, checks gradients and directions for
    NaN/Inf (:mod:`riemannlora.optim.guard`), and only then lets the subclass run torch's
    update kernel per group (:meth:`_update_group`). Factors may be FSDP2 DTensors
    (:mod:`riemannlora.distributed`).
    """

    param_groups: list[dict[str, Any]]
    state: dict
    defaults: dict[str, Any]
    _names: dict[int, str]
    #: Whether LoRA groups default to torch's fused kernel (``fused=None``).
    _fuse_lora = False

    def _extra_defaults(self, reg: float, scale_aware: bool, gram_dtype) -> dict[str, Any]:
        check_number("reg", reg, low=0.0)
        if not isinstance(scale_aware, bool):
            raise TypeError(f"scale_aware must be a bool, got {type(scale_aware).__name__}")
        if gram_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(
                f"gram_dtype must be None, torch.float32 or torch.float64, got {gram_dtype!r}"
            )
        return {"reg": float(reg), "scale_aware": scale_aware, "gram_dtype": gram_dtype}

    def _init_names(self, params: LoraParams) -> None:
        """Names of the parameters, for error messages; the optimizer is recorded so that a later
        conversion of its factors raises (:mod:`riemannlora.manifold.holders`)."""
        track(self)
        self._names = {}
        for pair in params.pairs:
            self._names[id(pair.a)] = f"{pair.name or 'pair'}.lora_A"
            self._names[id(pair.b)] = f"{pair.name or 'pair'}.lora_B"
        for k, p in enumerate(params.others):
            names = params.other_names
            self._names[id(p)] = names[k] if k < len(names) else f"other parameter {k}"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group. Plain parameters get the plain rule; LoRA groups need ``lora=True``,
        params ``[A0, B0, A1, B1, ...]`` and one ``scalings`` entry per pair."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        param_group.setdefault("lora", False)
        if param_group["lora"]:
            params = list(param_group["params"])
            scalings = param_group.get("scalings")
            if scalings is None or len(params) != 2 * len(scalings):
                raise ValueError(
                    "a LoRA param group needs params [A0, B0, A1, B1, ...] and one 'scalings' "
                    "entry per pair; build it from riemannlora.find_lora_pairs(model)"
                )
            for k in range(len(scalings)):  # validates shapes (raises on mismatched pairs)
                LoraPair(params[2 * k], params[2 * k + 1], scalings[k], f"pair {k}")
            if (
                self._fuse_lora
                and param_group.get("fused", self.defaults.get("fused")) is None
                and param_group.get("foreach", self.defaults.get("foreach")) is None
                and not param_group.get("differentiable", self.defaults.get("differentiable"))
            ):  # the LoRA factors get torch's single-pass kernel where it exists
                param_group["fused"] = _fused_supported(params)
            if self._fuse_lora and any(p.dtype == torch.float16 for p in params):
                _check_float16_kernel(param_group, self.defaults)
        super().add_param_group(param_group)  # type: ignore[misc]

    def _name(self, p: Tensor) -> str:
        """A readable name of parameter ``p`` (pair name and factor for LoRA factors)."""
        for group in self.param_groups:
            for k, q in enumerate(group["params"]):
                if q is p and group["lora"] and k // 2 < len(group.get("pair_names", ())):
                    return f"{group['pair_names'][k // 2] or 'pair'}.lora_{'AB'[k % 2]}"
        return getattr(self, "_names", {}).get(id(p), f"parameter of shape {tuple(p.shape)}")

    def _directions(self) -> tuple[dict[int, Tensor], list[Tensor], list[tuple[str, Tensor]]]:
        """``D`` (local shard) of every LoRA factor with a gradient, keyed by ``id(param)``, and
        the tensors the guard checks, with (kind, owner): the gradients of plain parameters and
        the directions of LoRA factors. A non-finite ``G`` always gives a non-finite ``D``
        (the inverse Grams are SPD: their diagonal is positive), so raw LoRA gradients need no
        second pass."""
        directions: dict[int, Tensor] = {}
        checked: list[Tensor] = []
        owners: list[tuple[str, Tensor]] = []
        for gi, group in enumerate(self.param_groups):
            check_group_hyperparameters(gi, group)
            params = group["params"]
            grads = [p.grad for p in params]
            if not group["lora"]:
                for p, g in zip(params, grads):
                    if g is not None:
                        checked.append(g)
                        owners.append(("gradient", p))
                continue
            a, b = params[0::2], params[1::2]
            for pa, pb in zip(a, b):
                check_lora_pair(pa, pb, self._name)
            ds = precondition_local(
                a,
                b,
                grads[0::2],
                grads[1::2],
                group["scalings"],
                group["reg"],
                group["scale_aware"],
                group["gram_dtype"],
            )
            for factors, dirs in zip((a, b), ds):
                for p, d in zip(factors, dirs):
                    if d is not None:
                        directions[id(p)] = d
                        checked.append(d)
                        owners.append(("preconditioned direction", p))
        return directions, checked, owners

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (``closure`` re-evaluates the model, as in torch).

        Nothing changes when a gradient or direction is not finite (``nonfinite="skip"``:
        ``skipped_steps`` goes up; ``"raise"``: :class:`~riemannlora.optim.guard.NonFiniteError`).
        """
        loss = run_closure(closure)
        directions, checked, owners = self._directions()
        labels = lambda: [_label(kind, p, self) for kind, p in owners]  # noqa: E731
        if self._step_allowed(checked, labels, sharded_like=[p for _, p in owners]):
            for group in self.param_groups:
                self._update_group(group, directions)
        return loss

    def _update_group(self, group: dict[str, Any], directions: dict[int, Tensor]) -> None:
        """Run torch's update kernel on one group (LoRA groups: ``directions`` as gradients)."""
        raise NotImplementedError

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The keys every non-empty per-parameter state of ``group`` must hold."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, after checking that it belongs to the same LoRA layout and holds
        finite values; on any error nothing is loaded."""
        check_state_dict(self, state_dict, self._state_keys, self._name)
        # the kernel choice (foreach / fused) is this optimizer's, not the checkpoint's: a run
        # resumed with fused=False stays unfused, an old checkpoint gets today's default (torch
        # casts the step counters to the kernel's layout on load)
        groups = [
            {**saved, **{k: mine[k] for k in ("foreach", "fused") if k in mine}}
            for saved, mine in zip(state_dict["param_groups"], self.param_groups)
        ]
        super().load_state_dict({**state_dict, "param_groups": groups})  # type: ignore[misc]


def _label(kind: str, p: Tensor, opt: _ScaledMixin) -> str:
    """``"gradient of X"`` or, when X's own gradient is finite, ``"preconditioned direction of
    X"`` (only called after a failed check)."""
    if kind != "gradient" and p.grad is not None and bool(torch.isfinite(local(p.grad)).all()):
        return f"{kind} of {opt._name(p)}"
    return f"gradient of {opt._name(p)}"


class ScaledAdamW(_ScaledMixin, torch.optim.AdamW):
    r"""AdamW on Riemannian-preconditioned LoRA gradients ("scaled AdamW").

    For each LoRA pair the preconditioned gradients ``D_A = (c B^T B + reg I)^{-1} G_A`` and
    ``D_B = G_B (A A^T + reg I)^{-1} / c`` (``c = s^2`` when ``scale_aware``, else 1) replace the
    raw gradients *before* the Adam moments::

        p <- p (1 - lr wd);  m <- b1 m + (1 - b1) D;  v <- b2 v + (1 - b2) D^2
        p <- p - lr m_hat / (sqrt(v_hat) + eps)

    Every other trainable parameter follows ``torch.optim.AdamW`` bitwise. State is AdamW's.
    ``.grad`` is never modified. Factors may be FSDP2 DTensors (exact, see
    :mod:`riemannlora.distributed`).

    Args:
        model: the model (e.g. a ``peft.PeftModel``), ``find_lora_pairs(model)`` or a list of
            :class:`~riemannlora.LoraPair`.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``
            (``weight_decay`` defaults to 0, the usual LoRA setting).
        foreach, fused: torch's kernel choice, as ``torch.optim.AdamW``. Non-LoRA parameters use
            exactly torch's choice (so they match ``torch.optim.AdamW`` with the same flags
            bitwise). The LoRA factors use torch's fused (single-pass) AdamW kernel by default
            on CPU and CUDA; ``foreach=True``/``False`` or ``fused=False`` select torch's
            multi-tensor or single-tensor kernel for them too. The choice is the optimizer's:
            ``load_state_dict`` keeps it whatever the checkpoint was saved with. float16
            factors require the fused kernel (torch's float16 AdamW arithmetic writes Inf/NaN).
            ``fused=True`` does not make the optimizer unscale AMP gradients itself:
            ``GradScaler`` unscales and skips steps as for any optimizer.
        reg: damping of the Gram matrices (``>= 0``).
        scale_aware: precondition with the effective factor ``s B`` (True) or ``B`` as in the
            paper (False).
        bias_correction: Adam bias correction (on, as torch; off reproduces some reference runs).
        gram_dtype: ``torch.float64`` to run the r x r algebra in double precision.
        nonfinite: what a step with NaN/Inf gradients does: ``"skip"`` it (default; counted in
            ``skipped_steps``), ``"raise"``, or ``"off"`` (no check). See
            :mod:`riemannlora.optim.guard`.
    """

    _fuse_lora = True

    def __init__(
        self,
        model: Any,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        reg: float = DEFAULT_REG,
        scale_aware: bool = DEFAULT_SCALE_AWARE,
        *,
        bias_correction: bool = True,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        gram_dtype: torch.dtype | None = None,
        nonfinite: str = "skip",
    ) -> None:
        check_number("lr", lr, low=0.0, strict=True)
        if foreach and fused:
            raise ValueError("foreach=True and fused=True cannot be used together (as in torch)")
        check_betas("betas", betas)
        check_number("eps", eps, low=0.0)
        check_number("weight_decay", weight_decay, low=0.0)
        if not bias_correction and (amsgrad or maximize):
            raise ValueError("bias_correction=False supports neither amsgrad nor maximize")
        extra = self._extra_defaults(reg, scale_aware, gram_dtype)
        extra["bias_correction"] = bool(bias_correction)
        self._init_guard(nonfinite)
        params = as_lora_params(model)
        super().__init__(
            _lora_groups(params, extra),
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        # GradScaler must unscale the raw gradients and skip steps itself: the preconditioner
        # needs true gradients, so the fused kernel's own unscaling (amp) is never used.
        self._step_supports_amp_scaling = False
        self.defaults.update(extra)
        self._init_names(params)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        keys = ("step", "exp_avg", "exp_avg_sq")
        return (*keys, "max_exp_avg_sq") if group["amsgrad"] else keys

    def _update_group(self, group: dict[str, Any], directions: dict[int, Tensor]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        has_complex = self._init_group(
            group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps
        )
        if not params:
            return
        group_params = params
        if group["lora"]:  # the directions replace the gradients; sharded: local shards
            params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = (
                [local(t) for t in ts] for ts in (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
            )
            # in the parameters' memory layout (e.g. channels_last or transposed factors): the
            # fused kernel walks gradient and parameter with the parameter's strides
            grads = [_like_layout(directions[id(p)], lp) for p, lp in zip(group_params, params)]
        beta1, beta2 = group["betas"]
        if not group.get("bias_correction", True):
            _adam_without_bias_correction(
                params, grads, exp_avgs, exp_avg_sqs, steps, beta1, beta2, group
            )
            return
        adamw_from_group(
            group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, has_complex
        )


#: Devices whose fused AdamW kernel is the default for LoRA factors (others: ``fused=True``).
_FUSED_DEFAULT_DEVICES = ("cpu", "cuda")


def _check_float16_kernel(group: dict[str, Any], defaults: dict[str, Any]) -> None:
    """float16 LoRA factors need torch's fused AdamW kernel, which does its arithmetic in
    float32: the other kernels compute in float16, where ``eps = 1e-8`` rounds to 0 and small
    second moments underflow, so they write Inf/NaN into the factors (torch.optim.AdamW does
    the same with float16 parameters)."""
    fused = group.get("fused", defaults.get("fused"))
    bias_correction = group.get("bias_correction", defaults.get("bias_correction", True))
    if fused and bias_correction:
        return
    raise ValueError(
        "float16 LoRA factors with AdamW's float16 arithmetic (foreach/single-tensor kernels, "
        "or bias_correction=False) underflow and write Inf/NaN into the factors. Keep the "
        "default fused kernel (fused=None or True, bias_correction=True), keep the factors in "
        "float32 and use torch.autocast, or use bfloat16 factors."
    )


def _like_layout(d: Tensor, p: Tensor) -> Tensor:
    """``d`` with the strides of ``p`` (a copy only when they differ)."""
    if d.stride() == p.stride():
        return d
    return torch.empty_like(p).copy_(d)


def _fused_supported(params: list[Tensor]) -> bool:
    """Whether the LoRA factors default to torch's fused AdamW kernel: every one of ``params``
    is a floating-point tensor on a CPU or CUDA device (the kernels tested here)."""
    return all(
        p.device.type in _FUSED_DEFAULT_DEVICES and p.dtype.is_floating_point for p in params
    )


def _adam_without_bias_correction(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    beta1: float,
    beta2: float,
    group: dict[str, Any],
) -> None:
    """``p <- p (1 - lr wd) - lr m / (sqrt(v) + eps)`` without the ``1 - beta^t`` factors."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    torch._foreach_add_(steps, 1)
    if wd:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)


class ScaledSGD(_ScaledMixin, torch.optim.SGD):
    r"""SGD on Riemannian-preconditioned LoRA gradients ("scaled GD").

    ``p <- p (1 - lr wd)`` (decoupled, applied after ``D`` is computed), then
    ``A <- A - lr D_A``, ``B <- B - lr D_B`` with ``D`` as in :class:`ScaledAdamW`. Optional heavy-ball
    ``momentum`` (an extension; the paper has none) is torch's SGD momentum applied to ``D``.
    Other parameters follow ``torch.optim.SGD`` (with the same decoupled weight decay).

    Args:
        model: the model, ``find_lora_pairs(model)`` or a list of :class:`~riemannlora.LoraPair`.
        lr: learning rate (> 0).
        weight_decay: decoupled weight decay (``>= 0``).
        reg, scale_aware, gram_dtype, nonfinite: as :class:`ScaledAdamW`.
        momentum, dampening, nesterov, maximize, foreach: as ``torch.optim.SGD``.
    """

    def __init__(
        self,
        model: Any,
        lr: float,
        weight_decay: float = 0.0,
        reg: float = DEFAULT_REG,
        scale_aware: bool = DEFAULT_SCALE_AWARE,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        gram_dtype: torch.dtype | None = None,
        nonfinite: str = "skip",
    ) -> None:
        check_number("lr", lr, low=0.0, strict=True)
        check_number("weight_decay", weight_decay, low=0.0)
        check_number("momentum", momentum, low=0.0)
        check_number("dampening", dampening)
        extra = self._extra_defaults(reg, scale_aware, gram_dtype)
        self._init_guard(nonfinite)
        params = as_lora_params(model)
        super().__init__(
            _lora_groups(params, extra),
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
        )
        self.defaults.update(extra)
        self._init_names(params)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] else ()

    def _update_group(self, group: dict[str, Any], directions: dict[int, Tensor]) -> None:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        buffers: list[Tensor | None] = []
        has_sparse = self._init_group(group, params, grads, buffers)
        if not params:
            return
        new_buffer = [buf is None for buf in buffers]
        updated = params
        if group["lora"]:  # the directions replace the gradients; sharded: local shards
            grads = [directions[id(p)] for p in params]
            updated = [local(p) for p in params]
            buffers = [None if buf is None else local(buf) for buf in buffers]
        wd = group["weight_decay"]  # decoupled: applied here, not added to the gradient
        if wd:
            torch._foreach_mul_(updated, 1 - group["lr"] * wd)
        sgd(
            updated,
            grads,
            buffers,
            weight_decay=0.0,
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            has_sparse_grad=has_sparse,
            foreach=group["foreach"],
            fused=group["fused"],
        )
        if group["momentum"] != 0:
            for p, buf, new in zip(params, buffers, new_buffer):
                if new:  # sgd() created it from the (local) direction
                    self.state[p]["momentum_buffer"] = wrap_like(buf, p)
