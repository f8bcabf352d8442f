"""Tall matrices whose rows may be split over processes: what a computation asks of them.

The step's tall matrices (``m`` rows: ``U``, ``G Q``, the momentum's left basis, the
direction ``dU``) may be row-sharded (FSDP2). The computations of
:mod:`riemannlora.core.geometry` and :mod:`riemannlora.core.manifold_step` that touch them are
generators which yield a request where the rows must meet, and go on with the answer:

* :class:`RowSum`: sum these tensors (e.g. ``r x r`` Grams ``U^T G Q``) in place over the
  row shards; answered by ``None``;
* :class:`TallQR`: the QR of a tall matrix; answered by ``(Q, R)``, Q with the caller's rows.

With whole rows (one process) nothing is summed and the QR is Householder's:
:func:`run_whole_rows` runs such a computation to its result. A sharded driver
(:mod:`riemannlora.distributed`) runs the computations of many groups of layers side by side
and answers each round of requests with one collective: the reduction hook of the step, as
``reduce_gram_b`` is the preconditioner's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from typing import Any, NamedTuple, ParamSpec, TypeVar

import torch
from torch import Tensor

__all__ = [
    "RowSum",
    "TallQR",
    "over_whole_rows",
    "positive_diagonal_",
    "qr_whole",
    "run_whole_rows",
]

T = TypeVar("T")
P = ParamSpec("P")

#: a computation over tall matrices: yields requests, returns its result
RowSteps = Generator["RowSum | TallQR", Any, T]


class RowSum(NamedTuple):
    """Request: sum ``tensors`` in place over the row shards of the tall matrices they were
    computed from (nothing to do when the rows are whole)."""

    tensors: list[Tensor]


class TallQR(NamedTuple):
    """Request: the reduced QR ``Y = Q R`` of the tall ``Y`` ``(..., m, r)`` (this process's
    rows). ``positive``: with ``diag(R) >= 0`` (the unique factors of a full-rank Y), and Q may
    be written into Y's memory (column-major Y); otherwise LAPACK's signs. Answered by
    ``(Q, R)``, Q with the rows of Y."""

    Y: Tensor
    positive: bool


def positive_diagonal_(Q: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """Normalizes a QR factorization to ``diag(R) >= 0`` in place (flips the signs of columns
    of Q and rows of R)."""
    sign = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(R.dtype)
    return Q.mul_(sign.unsqueeze(-2)), R.mul_(sign.unsqueeze(-1))


def qr_whole(request: TallQR) -> tuple[Tensor, Tensor]:
    """Householder's answer to a :class:`TallQR` over whole rows (in Y's memory when
    ``positive``)."""
    Y = request.Y
    if not request.positive:
        return torch.linalg.qr(Y)
    R = Y.new_empty(*Y.shape[:-2], Y.shape[-1], Y.shape[-1])
    torch.linalg.qr(Y, out=(Y, R))
    return positive_diagonal_(Y, R)


def run_whole_rows(steps: RowSteps[T]) -> T:
    """Runs a computation over whole rows (one process): sums are complete, QRs Householder."""
    try:
        request = next(steps)
        while True:
            request = steps.send(qr_whole(request) if isinstance(request, TallQR) else None)
    except StopIteration as stop:
        return stop.value


def over_whole_rows(steps: Callable[P, RowSteps[T]], name: str) -> Callable[P, T]:
    """The function ``name`` that runs the computation ``steps`` over whole rows (one
    process), with its parameters."""

    @functools.wraps(steps)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return run_whole_rows(steps(*args, **kwargs))

    run.__name__ = run.__qualname__ = name
    return run
