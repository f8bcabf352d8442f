r"""Sharded (FSDP2 / DTensor) LoRA factors: exact optimizer steps with few collectives.

Under DDP every rank holds whole factors and identical all-reduced gradients, so the optimizers
need nothing from this module (convert a model to manifold form *before* wrapping it). Under
FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a DTensor sharded on dim 0
over ``W`` ranks (``torch.chunk`` layout, the last ranks' shards possibly empty): ``A``
``(r, n)`` by rows of the rank dimension, ``B`` ``(m, r)`` by output rows, and their gradients
alike. Rank ``k`` computes exactly the single-process step for its shard.

**ScaledSGD / ScaledAdamW** (:func:`precondition_local`):

* ``B^T B = sum_k B_k^T B_k``: the local ``(r, r)`` Grams are summed by an all-reduce.
* ``A A^T`` mixes all rows of ``A``, and ``D_A = (c B^T B + reg I)^{-1} G_A`` mixes all rows of
  ``G_A``: both ``A`` and ``G_A`` are gathered (they are small, ``r x n``). Every rank then holds the
  same ``(r, r)`` inverses and takes its rows of ``D_A``.
* ``D_B = G_B (A A^T + reg I)^{-1} / c`` is row-local: ``D_B`` rows of rank ``k`` are
  ``G_{B,k}`` times the (replicated) inverse, no communication.

Communication per optimizer step, for the pairs ``p`` sharded over one process group of ``W``
ranks, with every collective batched over all pairs (not one per layer):

* one all-reduce of ``sum_p r_p^2`` values in the compute dtype (the ``B`` Grams, float32),
* one all-gather in which each rank sends ``sum_p 2 * ceil(r_p / W) * n_p`` values in the factors'
  dtype (the rows of ``A`` and ``G_A``; padded to equal shard sizes),
* one all-reduce of one value (the verdict of the non-finite check, see
  :mod:`riemannlora.optim.guard`; none with ``nonfinite="off"``).

For a model with ``L`` adapted ``(m, n)`` layers of rank ``r`` that is ``L r^2`` plus
``2 L r n`` values received per rank: less than the LoRA gradients' own reduce-scatter when
``n <= m``, and a fraction ``2 r / m`` of what FSDP already all-gathers for the frozen base
weights each step. Both Grams and ``D`` equal the single-process values up to the summation
order of the all-reduced ``B^T B``.

**Riemannion / RiemannianSGD** (:func:`manifold_step_sharded`). The manifold form
(:mod:`riemannlora.manifold`) stores ``lora_A = [Q | V | -V0]^T`` ``(w, n)`` and
``lora_B = [Z1 | U | U0]`` ``(m, w)``, ``w = 2r`` (``3r`` with an LOI offset); the gradients
carry ``G Q`` (rows of ``lora_B.grad``) and ``G^T U`` (rows of ``lora_A.grad``). The step is
the single-process structured step (:func:`riemannlora.core.manifold_step.structured_steps`)
on this rank's rows of the tall matrices; where their rows must meet it asks for a sum or a QR
(:mod:`riemannlora.core.rows`), and the groups' requests are answered together:

* ``A`` and ``G_A`` (small, ``w x n``) are all-gathered: ``Q``, ``V``, ``G^T U``, the momentum's
  right basis ``(n, 2r)``, the QR of the ``n``-side direction and the new ``V`` and ``Q`` are
  whole and identical on every rank (replicated work, ``O(n r^2)``).
* Everything with ``m`` rows (``U``, ``G Q``, the momentum's left basis ``(m, 2r)``, the
  direction ``dU``, the new ``U``) stays row-sharded; it enters the small algebra only through
  ``r x r`` Grams that are all-reduced: ``U^T G Q`` and the momentum's coordinates
  ``Lb^T U`` (projection and transport); ``dU^T dU`` twice, for the tall QR of ``dU`` as
  Cholesky-QR2 (:func:`riemannlora.core.geometry.cholesky_qr2_steps`: Grams in float64, a
  second pass that makes the basis orthonormal to working precision, ``diag(R) > 0``, which is
  the normalization of the single-process Householder QR, so both give the same basis up to
  rounding); and the Gram of the new ``U`` (the retraction's Cholesky re-orthonormalization,
  the single-process one). The ``2r x 2r`` cores (msign, the retraction's SVD) are replicated.
* Layers with ``2r > min(m, n)`` (the literal kernel: tiny, rare) are gathered whole in the
  same all-gather and stepped identically on every rank.
* A degenerate step, i.e. ``dU`` rank-deficient or too ill-conditioned for Cholesky-QR2 (e.g. an
  all-zero gradient) or a retraction whose Cholesky check fails, gathers the affected ``(m, r)``
  factors and takes the single-process Householder route: one more all-gather each, only in
  such steps. Every rank takes the same decision, from the same all-reduced Grams.

Communication per optimizer step, for the layers ``p`` sharded over one process group of ``W``
ranks, every collective batched over all layers: one all-gather in which each rank sends
``sum_p 2 * ceil(w_p / W) * n_p`` values (rows of ``A`` and ``G_A``); four all-reduces of small
Grams, ``sum_p 6 r_p^2`` values in all (``4 r_p^2`` while there is no momentum yet; two of the
four in float64); one all-reduce of one value (the non-finite verdict). For ``L`` layers of rank
``r`` without offset each rank receives about ``4 L r n`` values, twice the scaled optimizers'
``2 L r n`` because ``lora_A`` has width ``2r``, still a fraction ``4 r / m`` of the frozen base
weights FSDP gathers anyway; ``m``-sized data is never communicated. The momentum is stored as
DTensors, as the plain factor pair ``M = momentum_left momentum_right^T``:
``momentum_left`` ``(m, 2r)`` sharded like ``lora_B``, ``momentum_right`` ``(n, 2r)``
replicated, so ``torch.distributed.checkpoint`` state dicts save and reshard them. The result
equals the single-process step up to summation order (checked in float64 to ``1e-12``).

Supported layouts: ``Shard(0)`` on one mesh dimension, ``Replicate`` on the others (FSDP, HSDP).

* :mod:`~riemannlora.distributed.tensors` -- the DTensor helpers and batched collectives shared
  by both families (:func:`gather_rows`, :func:`all_reduce_sum`, :func:`any_across`,
  :func:`local`, :func:`wrap_like`, ...);
* :mod:`~riemannlora.distributed.scaled` -- :func:`precondition_local`;
* :mod:`~riemannlora.distributed.manifold_step` -- :func:`manifold_step_sharded`.
"""

from riemannlora.distributed.manifold_step import ShardedManifoldGroup, manifold_step_sharded
from riemannlora.distributed.scaled import precondition_local
from riemannlora.distributed.tensors import (
    all_reduce_sum,
    any_across,
    gather_rows,
    is_dtensor,
    local,
    pair_group,
    row_range,
    shard_group,
    wrap_like,
    wrap_replicated,
    wrap_rows,
)

__all__ = [
    "ShardedManifoldGroup",
    "all_reduce_sum",
    "any_across",
    "gather_rows",
    "is_dtensor",
    "local",
    "manifold_step_sharded",
    "pair_group",
    "precondition_local",
    "row_range",
    "shard_group",
    "wrap_like",
    "wrap_replicated",
    "wrap_rows",
]
