"""Where the manifold optimizers keep the factors: packed per group of equal-shape layers.

Created without a ``torch.distributed`` process group, a manifold optimizer moves the factors of
each group of equal-shape layers into two buffers (:func:`pack_factors_`), so that its step
reads the point in place and writes the new one with one product per buffer; ``lora_B`` is
stored column-major (:func:`column_major_`), the layout in which the step stacks its blocks.
The factors' ``state_dict`` entries stay standalone contiguous tensors
(:func:`standalone_state`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from riemannlora import distributed
from riemannlora.core.manifold_step import structured_shape
from riemannlora.manifold import ManifoldLayer
from riemannlora.manifold.layers import group_indices

__all__ = ["column_major_", "pack_factors_", "packed_buffer", "standalone_state"]


def column_major_(p: nn.Parameter) -> None:
    """Stores a ``lora_B`` factor ``(m, w)`` column-major, in place (same Parameter, same
    values): its block ``U^T`` and, by autograd's gradient layout contract, its gradient's
    ``(G Q)^T`` are then contiguous ``(r, m)`` rows, the layout the step stacks them in, so the
    step gathers and writes them back with plain copies instead of transposing ones (the
    forward and backward products run as fast in either layout). Sharded factors and factors
    already laid out so are left alone."""
    if distributed.is_dtensor(p) or p.dim() != 2 or p.stride() == (1, p.shape[0]):
        return
    p.data = p.data.mT.contiguous().mT
    if p.grad is not None:
        p.grad = p.grad.mT.contiguous().mT


def pack_factors_(layers: list[ManifoldLayer]) -> None:
    """Moves the factors of every group of equal-shape layers into two buffers per group, in
    place (same Parameters, same values): ``lora_A`` ``(w, n)`` becomes ``pa[i]`` of a
    contiguous ``pa`` ``(L, w, n)`` and ``lora_B`` ``(m, w)`` becomes ``pb[i]^T`` of a
    contiguous ``pb`` ``(L, w, m)`` (column-major, see :func:`column_major_`; ``w = 2r``, or
    ``3r`` with an offset). The step then reads the point ``Q^T = pa[:, :r]``,
    ``V^T = pa[:, r:2r]``, ``U^T = pb[:, r:2r]`` in place and writes the new one with one
    product per buffer, instead of stacking the factors into buffers of its own and copying
    the result back layer by layer. Layers that cannot step structured, and sharded ones, are
    only made column-major."""
    keys = []
    for layer in layers:
        a, b = layer.a, layer.b
        column_major_(b)
        ok = not (distributed.is_dtensor(a) or distributed.is_dtensor(b)) and a.dim() == 2
        m, n, w = b.shape[0], a.shape[1], a.shape[0]
        ok = ok and structured_shape(m, n, layer.rank) and b.shape[1] == w
        # the step's grouping (GroupKey), so that each of its groups is one buffer
        keys.append((m, n, layer.rank, layer.offset, w, a.dtype, a.device) if ok else None)
    for key, idx in group_indices(keys).items():
        if key is None:
            continue
        m, n, _, _, w, dtype, device = key
        A, B = [layers[k].a for k in idx], [layers[k].b for k in idx]
        if packed_buffer(A, w, n, False) is not None and packed_buffer(B, w, m, True) is not None:
            continue  # packed so already (e.g. by an earlier optimizer)
        pa = torch.empty(len(idx), w, n, dtype=dtype, device=device)
        pb = torch.empty(len(idx), w, m, dtype=dtype, device=device)
        for j, k in enumerate(idx):
            a, b = layers[k].a, layers[k].b
            pa[j].copy_(a.data)
            pb[j].copy_(b.data.mT)
            a.data = pa[j]
            b.data = pb[j].mT
    for layer in layers:
        for name in ("lora_A", "lora_B"):
            module = layer.module._modules[name]._modules[layer.adapter]  # type: ignore[union-attr]
            if not getattr(module, "_riemannlora_standalone_state", False):
                module.register_state_dict_post_hook(standalone_state)
                module._riemannlora_standalone_state = True  # type: ignore[assignment]


def standalone_state(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """``state_dict`` post-hook of the factors' modules: a factor that is a view into a larger
    buffer (:func:`pack_factors_`) or not contiguous (``lora_B``) is returned as a contiguous
    copy of its own, so that ``safetensors`` (which refuses shared or strided tensors) and
    Accelerate's checkpoints (which drop all but one of the tensors that share a storage)
    get every factor whole. ``keep_vars=True`` still returns the Parameters themselves."""
    key = prefix + "weight"
    t = state_dict.get(key)
    if t is None or isinstance(t, nn.Parameter) or distributed.is_dtensor(t):
        return
    if (
        not t.is_contiguous()
        or t.storage_offset() != 0
        or t.untyped_storage().nbytes() != t.numel() * t.element_size()
    ):
        state_dict[key] = t.clone(memory_format=torch.contiguous_format)


def packed_buffer(ts: list[Tensor], rows: int, cols: int, transposed: bool) -> Tensor | None:
    """The ``(L, rows, cols)`` buffer of :func:`pack_factors_` whose per-layer blocks are
    ``ts`` (transposed ones for ``lora_B``), in this order; None if they are not laid out so."""
    t0 = ts[0]
    storage = t0.untyped_storage()
    base = t0.storage_offset()
    size = rows * cols
    stride = (1, cols) if transposed else (cols, 1)
    for i, t in enumerate(ts):
        if (
            t.untyped_storage().data_ptr() != storage.data_ptr()
            or t.storage_offset() != base + i * size
            or t.stride() != stride
        ):
            return None
    if (base + len(ts) * size) * t0.element_size() > storage.nbytes():
        return None
    return t0.new_empty(0).set_(storage, base, (len(ts), rows, cols), (size, cols, 1))
