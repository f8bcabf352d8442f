"""Fixed-rank geometry on factors, checked against dense float64 definitions.

Every reference below is computed here from dense ``m x n`` matrices with plain
``torch.linalg`` calls, never by calling another function of ``riemannlora.core.geometry``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from riemannlora.core import geometry as geo

F64 = torch.float64
TOL = 1e-10  # float64, relative to the size of the reference
PROPERTY = settings(deadline=None, max_examples=25)


# ---------------------------------------------------------------- strategies and builders


@st.composite
def problems(draw, max_k: int = 6):
    """(m, n, r, k, seed): matrix shape, rank, a width for ambient factors, an RNG seed."""
    m = draw(st.integers(4, 24))
    n = draw(st.integers(4, 24))
    r = draw(st.integers(1, min(m, n) // 2))
    k = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    return m, n, r, k, seed


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def random_point(gen, m, n, r, batch=()):
    """U (m, r) orthonormal, V (n, r) free, Q = an orthonormal basis of span(V) (plain qr)."""
    U = torch.linalg.qr(randn(gen, *batch, m, r)).Q
    V = randn(gen, *batch, n, r)
    Q = torch.linalg.qr(V).Q
    return U, V, Q


def random_tangent(gen, U, Q):
    """(dU, dV) with U^T dU = 0."""
    dU = randn(gen, *U.shape)
    dU = dU - U @ (U.mT @ dU)
    return dU, randn(gen, *Q.shape)


def dense_projection(U, Q, Z):
    """P(Z) = U U^T Z + (I - U U^T) Z Q Q^T."""
    eye = torch.eye(U.shape[-2], dtype=Z.dtype)
    PU = U @ U.mT
    return PU @ Z + (eye - PU) @ Z @ Q @ Q.mT


def dense_tangent(U, Q, dU, dV):
    return dU @ Q.mT + U @ dV.mT


def dense_msign(A, rtol=1e-8):
    """A's SVD with every nonzero singular value (above rtol * max) set to 1."""
    W, S, Zh = torch.linalg.svd(A, full_matrices=False)
    keep = (S > rtol * S.amax(-1, keepdim=True)).to(A.dtype)
    return (W * keep.unsqueeze(-2)) @ Zh


def dense_truncate(A, r):
    """Best rank-r approximation of A and A's singular values."""
    W, S, Zh = torch.linalg.svd(A, full_matrices=False)
    return (W[..., :r] * S[..., None, :r]) @ Zh[..., :r, :], S


def assert_close(actual, expected, tol=TOL):
    """max |actual - expected| <= tol * max(1, max |expected|), and equal dtypes."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3e} > {tol:.1e} * {scale:.3e}"


def assert_orthonormal_columns(A, tol=TOL):
    eye = torch.eye(A.shape[-1], dtype=A.dtype).expand(*A.shape[:-2], -1, -1)
    assert_close(A.mT @ A, eye, tol)


def relative_singular_values(A):
    S = torch.linalg.svdvals(A)
    return S / S.amax(-1, keepdim=True)


# ------------------------------------------------------------------------ orthonormal basis


@PROPERTY
@given(problems())
def test_orthonormal_basis_is_positive_qr(problem):
    _, n, r, _, seed = problem
    V = randn(torch.Generator().manual_seed(seed), n, r)
    Q = geo.orthonormal_basis(V)
    assert Q.shape == (n, r) and Q.dtype == F64
    assert_orthonormal_columns(Q)
    T = Q.mT @ V  # the R factor: upper triangular with a non-negative diagonal
    assert_close(Q @ T, V)
    assert_close(torch.tril(T, -1), torch.zeros(r, r, dtype=F64))
    assert (torch.diagonal(T) >= 0).all()
    # unique for full column rank: equals plain QR with columns flipped to make diag(R) >= 0
    Q0, R0 = torch.linalg.qr(V)
    assert_close(Q, Q0 * torch.sign(torch.diagonal(R0)))


def test_qr_positive_factors_and_rank_deficiency():
    gen = torch.Generator().manual_seed(0)
    V = randn(gen, 9, 4)
    V[:, 2] = 0.0  # a dependent column: R_22 = 0, Q stays orthonormal and finite
    Q, R = geo.qr_positive(V)
    assert torch.isfinite(Q).all() and torch.isfinite(R).all()
    assert_orthonormal_columns(Q)
    assert_close(Q @ R, V)
    assert (torch.diagonal(R) >= 0).all()
    assert_orthonormal_columns(geo.orthonormal_basis(torch.zeros(7, 3, dtype=F64)))


# ------------------------------------------------------------------------------ projection


@PROPERTY
@given(problems())
def test_project_tangent_matches_dense_projection(problem):
    m, n, r, k, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, _, Q = random_point(gen, m, n, r)
    P, R = randn(gen, m, k), randn(gen, n, k)
    dU, dV = geo.project_tangent(U, Q, P, R)
    assert dU.shape == (m, r) and dV.shape == (n, r)
    assert_close(dense_tangent(U, Q, dU, dV), dense_projection(U, Q, P @ R.mT))
    assert_close(U.mT @ dU, torch.zeros(r, r, dtype=F64))  # tangent condition


@PROPERTY
@given(problems())
def test_projection_is_idempotent(problem):
    m, n, r, k, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, _, Q = random_point(gen, m, n, r)
    dU, dV = geo.project_tangent(U, Q, randn(gen, m, k), randn(gen, n, k))
    dU2, dV2 = geo.project_tangent(U, Q, torch.cat([dU, U], -1), torch.cat([Q, dV], -1))
    assert_close(dU2, dU)
    assert_close(dV2, dV)


@PROPERTY
@given(problems())
def test_projection_fixes_tangent_vectors(problem):
    m, n, r, _, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, _, Q = random_point(gen, m, n, r)
    dU, dV = random_tangent(gen, U, Q)
    xi = dense_tangent(U, Q, dU, dV)
    assert_close(dense_projection(U, Q, xi), xi)  # the dense reference agrees: xi is tangent
    # the factor form of a tangent vector is unique given (U, Q): P(xi) returns (dU, dV) itself
    pU, pV = geo.project_tangent(U, Q, torch.cat([dU, U], -1), torch.cat([Q, dV], -1))
    assert_close(pU, dU)
    assert_close(pV, dV)


@PROPERTY
@given(problems())
def test_transport_projects_old_tangent_vector_at_new_point(problem):
    m, n, r, _, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U0, _, Q0 = random_point(gen, m, n, r)
    U1, _, Q1 = random_point(gen, m, n, r)
    dU, dV = random_tangent(gen, U0, Q0)
    tU, tV = geo.transport(U1, Q1, torch.cat([dU, U0], -1), torch.cat([Q0, dV], -1))
    assert_close(
        dense_tangent(U1, Q1, tU, tV), dense_projection(U1, Q1, dense_tangent(U0, Q0, dU, dV))
    )
    assert_close(U1.mT @ tU, torch.zeros(r, r, dtype=F64))


@PROPERTY
@given(problems())
def test_riemannian_gradient_is_projected_euclidean_gradient(problem):
    m, n, r, _, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, _, Q = random_point(gen, m, n, r)
    G = randn(gen, m, n)
    dU, dV = geo.riemannian_gradient(U, G @ Q, G.mT @ U)
    assert_close(dense_tangent(U, Q, dU, dV), dense_projection(U, Q, G))
    assert_close(U.mT @ dU, torch.zeros(r, r, dtype=F64))


@PROPERTY
@given(problems())
def test_factor_and_dense_forms(problem):
    m, n, r, _, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, V, Q = random_point(gen, m, n, r)
    dU, dV = random_tangent(gen, U, Q)
    L, R = geo.tangent_to_factors(U, Q, dU, dV)
    assert L.shape == (m, 2 * r) and R.shape == (n, 2 * r)
    xi = dU @ Q.mT + U @ dV.mT
    assert_close(L @ R.mT, xi)
    assert_close(geo.tangent_to_dense(U, Q, dU, dV), xi)
    assert_close(geo.to_dense(U, V), U @ V.mT)


# ------------------------------------------------------------------------------------ msign


@PROPERTY
@given(problems())
def test_msign_tangent_matches_dense_msign(problem):
    m, n, r, _, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, _, Q = random_point(gen, m, n, r)
    dU, dV = random_tangent(gen, U, Q)
    xi = dense_tangent(U, Q, dU, dV)
    # msign amplifies errors by 1/s_min: keep the generic rank-2r case well conditioned
    assume(relative_singular_values(xi)[2 * r - 1] > 1e-4)
    OL, OR = geo.msign_tangent(U, Q, dU, dV)
    assert OL.shape == (m, 2 * r) and OR.shape == (n, 2 * r)
    assert_close(OL @ OR.mT, dense_msign(xi))
    assert_orthonormal_columns(OL)
    assert_orthonormal_columns(OR)


RANK_DEFICIENT = ["dU=0", "dV=0", "rank-1 dU and dV", "dV in span(Q)-only", "all zero"]


def rank_deficient_tangent(gen, U, Q, kind):
    dU, dV = random_tangent(gen, U, Q)
    n, r = Q.shape
    if kind == "dU=0":
        dU = torch.zeros_like(dU)
    elif kind == "dV=0":
        dV = torch.zeros_like(dV)
    elif kind == "rank-1 dU and dV":
        dU = dU[:, :1] @ randn(gen, 1, r)
        dV = randn(gen, n, 1) @ randn(gen, 1, r)
    elif kind == "dV in span(Q)-only":
        # xi = dU Q^T + U (Q C)^T has its row space inside span(Q): rank <= r
        dV = Q @ randn(gen, r, r)
    elif kind == "all zero":
        dU, dV = torch.zeros_like(dU), torch.zeros_like(dV)
    return dU, dV


@PROPERTY
@given(problems(), st.sampled_from(RANK_DEFICIENT))
def test_msign_tangent_rank_deficient(problem, kind):
    m, n, r, _, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, _, Q = random_point(gen, m, n, r)
    dU, dV = rank_deficient_tangent(gen, U, Q, kind)
    xi = dense_tangent(U, Q, dU, dV)
    rank = int(torch.linalg.matrix_rank(xi))
    assert rank < 2 * r or (r == 1 and kind == "rank-1 dU and dV")
    if rank:
        assume(relative_singular_values(xi)[rank - 1] > 1e-4)
    OL, OR = geo.msign_tangent(U, Q, dU, dV)
    assert torch.isfinite(OL).all() and torch.isfinite(OR).all()
    msign_xi = OL @ OR.mT
    assert_close(msign_xi, dense_msign(xi))
    # singular values exactly in {0, 1}: `rank` ones, the rest zero
    expected_S = torch.cat([torch.ones(rank, dtype=F64), torch.zeros(2 * r - rank, dtype=F64)])
    assert_close(torch.linalg.svdvals(msign_xi)[: 2 * r], expected_S)
    # dropped columns are exactly zero, kept ones orthonormal
    gram = OL.mT @ OL
    assert_close(gram, torch.diag(torch.diagonal(gram)))
    assert sorted(torch.diagonal(gram).round().tolist()) == sorted(expected_S.tolist())


def test_msign_tangent_of_zero_is_zero():
    gen = torch.Generator().manual_seed(1)
    U, _, Q = random_point(gen, 10, 8, 3)
    z = torch.zeros(10, 3, dtype=F64), torch.zeros(8, 3, dtype=F64)
    OL, OR = geo.msign_tangent(U, Q, *z)
    assert (OL == 0).all() and (OR == 0).all()


@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1e8, 1e30])
def test_msign_tangent_is_scale_invariant_per_batch_element(scale):
    # the zero threshold is relative and per layer: a tiny layer next to a big one is not zeroed
    gen = torch.Generator().manual_seed(2)
    U, _, Q = random_point(gen, 12, 9, 2, batch=(2,))
    dU, dV = random_tangent(gen, U, Q)
    dU[0] *= scale
    dV[0] *= scale
    OL, OR = geo.msign_tangent(U, Q, dU, dV)
    assert_close(OL @ OR.mT, dense_msign(dense_tangent(U, Q, dU, dV), rtol=1e-8), 1e-9)
    assert_orthonormal_columns(OL)


def test_msign_tangent_keeps_small_nonzero_singular_values():
    # xi^T xi = Q dU^T dU Q^T + dV dV^T when dV is orthogonal to Q, so xi's singular values are
    # those of dU (about 1e-5) and of dV (about 1): all 2r are nonzero and must map to 1
    gen = torch.Generator().manual_seed(9)
    U, _, Q = random_point(gen, 20, 16, 3)
    dU, dV = random_tangent(gen, U, Q)
    dU = 1e-5 * dU
    dV = dV - Q @ (Q.mT @ dV)
    xi = dense_tangent(U, Q, dU, dV)
    assert relative_singular_values(xi)[5] < 1e-4
    OL, OR = geo.msign_tangent(U, Q, dU, dV)
    assert_orthonormal_columns(OL)
    assert_close(OL @ OR.mT, dense_msign(xi, rtol=1e-8))


@pytest.mark.parametrize("kind", RANK_DEFICIENT)
def test_msign_tangent_rank_deficient_float32(kind):
    # in float32 the numerically-zero singular values (round-off, about eps * s_max) are dropped
    gen = torch.Generator().manual_seed(10)
    U, _, Q = random_point(gen, 24, 18, 4)
    dU, dV = rank_deficient_tangent(gen, U, Q, kind)
    U32, Q32, dU32, dV32 = (t.to(torch.float32) for t in (U, Q, dU, dV))
    xi = dense_tangent(*(t.to(F64) for t in (U32, Q32, dU32, dV32)))
    rank = int(torch.linalg.matrix_rank(xi, rtol=1e-6))
    if rank:
        assert relative_singular_values(xi)[rank - 1] > 1e-2  # fixed seed, well conditioned
    OL, OR = geo.msign_tangent(U32, Q32, dU32, dV32)
    assert OL.dtype == torch.float32
    assert_close((OL @ OR.mT).to(F64), dense_msign(xi, rtol=1e-6), 1e-5)
    kept = torch.diagonal(OL.mT @ OL)
    assert int((kept > 0.5).sum()) == rank
    assert (kept[kept <= 0.5] == 0).all()


# -------------------------------------------------------------------------------- retraction


@PROPERTY
@given(
    problems(),
    st.floats(1e-3, 10.0),
    st.sampled_from([0.0, 0.01, 0.5]),
    st.booleans(),
)
def test_retract_is_truncated_svd_of_the_step(problem, lr, wd, tangent_dU):
    m, n, r, _, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, V, Q = random_point(gen, m, n, r)
    dU, dV = random_tangent(gen, U, Q)
    if not tangent_dU:  # the retraction's algebra does not need U^T dU = 0
        dU = randn(gen, m, r)
    X = U @ V.mT
    step = X - lr * (dU @ Q.mT + U @ dV.mT + wd * X)
    X_r, S = dense_truncate(step, r)
    # the best rank-r approximation is unique (and stable) only with a gap after s_r
    gap = (S[r - 1] - S[r]) / S[0] if S.numel() > r else S[r - 1] / S[0]
    assume(gap > 1e-4 and S[r - 1] / S[0] > 1e-4)
    U_new, V_new = geo.retract(U, V, Q, dU, dV, lr, weight_decay=wd)
    assert U_new.shape == (m, r) and V_new.shape == (n, r)
    assert U_new.dtype == F64 and V_new.dtype == F64
    assert_orthonormal_columns(U_new)
    X_new = U_new @ V_new.mT
    assert_close(X_new, X_r)
    assert int(torch.linalg.matrix_rank(X_new)) == r


def test_retract_accepts_tensor_hyperparameters():
    gen = torch.Generator().manual_seed(3)
    U, V, Q = random_point(gen, 11, 7, 2)
    dU, dV = random_tangent(gen, U, Q)
    for lr_dtype in (torch.float32, F64):  # the tensor's value is used; its dtype does not demote
        lr, wd = torch.tensor(0.3, dtype=lr_dtype), torch.tensor(0.1, dtype=lr_dtype)
        a = geo.retract(U, V, Q, dU, dV, lr.item(), wd.item())
        b = geo.retract(U, V, Q, dU, dV, lr, wd)
        assert_close(b[0] @ b[1].mT, a[0] @ a[1].mT)
        assert b[0].dtype == F64 and b[1].dtype == F64


def test_retract_with_zero_step_returns_the_point():
    gen = torch.Generator().manual_seed(4)
    U, V, Q = random_point(gen, 13, 9, 3)
    dU, dV = random_tangent(gen, U, Q)
    U_new, V_new = geo.retract(U, V, Q, dU, dV, 0.0)
    assert_close(U_new @ V_new.mT, U @ V.mT)
    assert_close(U_new @ U_new.mT, U @ U.mT)  # same column space


def test_retract_from_the_zero_start():
    # non-LOI start: U orthonormal, V = 0 (X = 0), any orthonormal Q; the first step reaches rank r
    gen = torch.Generator().manual_seed(5)
    m, n, r, lr = 14, 10, 3, 0.05
    U = torch.linalg.qr(randn(gen, m, r)).Q
    V = torch.zeros(n, r, dtype=F64)
    Q = torch.linalg.qr(randn(gen, n, r)).Q
    G = randn(gen, m, n)
    dU = G @ Q - U @ (U.mT @ G @ Q)
    dV = G.mT @ U
    X_r, _ = dense_truncate(-lr * dense_projection(U, Q, G), r)
    U_new, V_new = geo.retract(U, V, Q, dU, dV, lr)
    assert_close(U_new @ V_new.mT, X_r)
    assert_orthonormal_columns(U_new)
    assert int(torch.linalg.matrix_rank(U_new @ V_new.mT)) == r


def test_retract_rank_deficient_step_keeps_gauge():
    # lr = 0 at X = 0: the step is 0, U_new stays orthonormal and V_new is zero
    gen = torch.Generator().manual_seed(6)
    U = torch.linalg.qr(randn(gen, 8, 2)).Q
    Q = torch.linalg.qr(randn(gen, 6, 2)).Q
    z = torch.zeros(6, 2, dtype=F64)
    U_new, V_new = geo.retract(U, z, Q, torch.zeros(8, 2, dtype=F64), z, 0.0)
    assert torch.isfinite(U_new).all() and (V_new == 0).all()
    assert_orthonormal_columns(U_new)


def test_wide_rank_2r_above_m():
    # 2r > m: the reduced QRs are (m, m) / (m, 2r); results still match the dense definitions
    gen = torch.Generator().manual_seed(7)
    m, n, r = 5, 9, 4
    U, V, Q = random_point(gen, m, n, r)
    dU, dV = random_tangent(gen, U, Q)
    xi = dense_tangent(U, Q, dU, dV)
    OL, OR = geo.msign_tangent(U, Q, dU, dV)
    assert_close(OL @ OR.mT, dense_msign(xi))
    X = U @ V.mT
    U_new, V_new = geo.retract(U, V, Q, dU, dV, 0.1)
    assert_close(U_new @ V_new.mT, dense_truncate(X - 0.1 * xi, r)[0])


# -------------------------------------------------------------------------- batching, dtypes


@PROPERTY
@given(problems(), st.integers(1, 3))
def test_batched_equals_loop(problem, batch):
    m, n, r, k, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, V, Q = random_point(gen, m, n, r, batch=(batch,))
    dU, dV = random_tangent(gen, U, Q)
    P, R = randn(gen, batch, m, k), randn(gen, batch, n, k)
    GQ, GtU = randn(gen, batch, m, r), randn(gen, batch, n, r)
    results = {
        "basis": (geo.orthonormal_basis(V),),
        "project": geo.project_tangent(U, Q, P, R),
        "gradient": geo.riemannian_gradient(U, GQ, GtU),
        "factors": geo.tangent_to_factors(U, Q, dU, dV),
        "msign": geo.msign_tangent(U, Q, dU, dV),
        "retract": geo.retract(U, V, Q, dU, dV, 0.2, 0.01),
    }
    for i in range(batch):
        single = {
            "basis": (geo.orthonormal_basis(V[i]),),
            "project": geo.project_tangent(U[i], Q[i], P[i], R[i]),
            "gradient": geo.riemannian_gradient(U[i], GQ[i], GtU[i]),
            "factors": geo.tangent_to_factors(U[i], Q[i], dU[i], dV[i]),
            "msign": geo.msign_tangent(U[i], Q[i], dU[i], dV[i]),
            "retract": geo.retract(U[i], V[i], Q[i], dU[i], dV[i], 0.2, 0.01),
        }
        for name, got in results.items():
            if name in ("msign", "retract"):  # SVD signs are free: compare the products
                assert_close(got[0][i] @ got[1][i].mT, single[name][0] @ single[name][1].mT)
            else:
                for a, b in zip(got, single[name], strict=True):
                    assert_close(a[i], b)


def well_conditioned_inputs(dtype, seed=8, m=16, n=12, r=3):
    """Random inputs rounded to `dtype`, and the same rounded values in float64."""
    gen = torch.Generator().manual_seed(seed)
    U, V, Q = random_point(gen, m, n, r)
    dU, dV = random_tangent(gen, U, Q)
    P, R = randn(gen, m, 4), randn(gen, n, 4)
    low = [t.to(dtype) for t in (U, V, Q, dU, dV, P, R)]
    return low, [t.to(F64) for t in low]


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)]
)
def test_low_precision_inputs_compute_in_float32(dtype, tol):
    # The identities hold for any factors (orthonormal or not), so the float64 reference uses the
    # very same rounded inputs; what is left is float32 round-off, not the input's rounding.
    low, ref = well_conditioned_inputs(dtype)
    U, V, Q, dU, dV, P, R = low
    U64, V64, Q64, dU64, dV64, P64, R64 = ref
    pU, pV = geo.project_tangent(U, Q, P, R)
    assert pU.dtype == torch.float32 and pV.dtype == torch.float32
    expected = dense_projection(U64, Q64, P64 @ R64.mT)
    assert_close(dense_tangent(U64, Q64, pU.to(F64), pV.to(F64)), expected, tol)

    xi = dense_tangent(U64, Q64, dU64, dV64)
    assert relative_singular_values(xi)[-1 + 2 * 3] > 1e-2  # fixed seed, well conditioned
    OL, OR = geo.msign_tangent(U, Q, dU, dV)
    assert OL.dtype == torch.float32
    assert_close((OL @ OR.mT).to(F64), dense_msign(xi), tol)

    lr, wd = 0.3, 0.01
    U_new, V_new = geo.retract(U, V, Q, dU, dV, lr, wd)
    assert U_new.dtype == torch.float32 and V_new.dtype == torch.float32
    X64 = U64 @ V64.mT
    X_r, S = dense_truncate(X64 - lr * (xi + wd * X64), 3)
    assert (S[2] - S[3]) / S[0] > 1e-2
    assert_close((U_new @ V_new.mT).to(F64), X_r, tol)
    assert_orthonormal_columns(U_new.to(F64), tol)

    assert geo.orthonormal_basis(V).dtype == torch.float32
    assert geo.riemannian_gradient(U, dU, dV)[0].dtype == torch.float32


def test_float64_stays_float64_and_mixed_inputs_promote():
    _, (U, V, Q, dU, dV, P, R) = well_conditioned_inputs(torch.float32)
    assert geo.orthonormal_basis(V).dtype == F64
    assert all(t.dtype == F64 for t in geo.msign_tangent(U, Q, dU, dV))
    assert all(t.dtype == F64 for t in geo.retract(U, V, Q, dU, dV, 0.1))
    # mixed: a bf16 ambient factor with a float64 point computes in float64
    assert geo.project_tangent(U, Q, P.to(torch.bfloat16), R)[0].dtype == F64
    assert geo.compute_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32


# ---------------------------------------------- structured fast path (TangentQR form)


def dense_from_qr(U, Q, t):
    """xi = Qd A Q^T + U (Q B + Qv C)^T of a TangentQR."""
    return t.Qd @ t.A @ Q.mT + U @ (Q @ t.B + t.Qv @ t.C).mT


@PROPERTY
@given(problems())
def test_tangent_qr_factors_the_tangent_vector(problem):
    m, n, r, _, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, _, Q = random_point(gen, m, n, r)
    dU, dV = random_tangent(gen, U, Q)
    t = geo.tangent_qr(U, Q, dU, dV)
    assert t.Qd.shape == (m, r) and t.Qv.shape == (n, r) and t.A.shape == (r, r)
    assert_close(dense_from_qr(U, Q, t), dense_tangent(U, Q, dU, dV))
    assert_orthonormal_columns(t.Qd)
    assert_orthonormal_columns(t.Qv)
    assert_close(U.mT @ t.Qd, torch.zeros(r, r, dtype=F64))  # [Qd | U] orthonormal
    assert_close(Q.mT @ t.Qv, torch.zeros(r, r, dtype=F64))  # [Q | Qv] orthonormal
    dU2, dV2 = geo.tangent_qr_to_factors(Q, t)
    assert_close(dU2, dU)
    assert_close(dV2, dV)


@PROPERTY
@given(problems())
def test_msign_tangent_qr_is_projected_msign(problem):
    m, n, r, _, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, _, Q = random_point(gen, m, n, r)
    dU, dV = random_tangent(gen, U, Q)
    xi = dense_tangent(U, Q, dU, dV)
    assume(relative_singular_values(xi)[2 * r - 1] > 1e-4)
    t = geo.msign_tangent_qr(geo.tangent_qr(U, Q, dU, dV))
    assert_close(dense_from_qr(U, Q, t), dense_projection(U, Q, dense_msign(xi)))
    # the same as the literal OrthoLR + ProjectLR
    OL, OR = geo.msign_tangent(U, Q, dU, dV)
    oU, oV = geo.project_tangent(U, Q, OL, OR)
    dU2, dV2 = geo.tangent_qr_to_factors(Q, t)
    assert_close(dU2, oU)
    assert_close(dV2, oV)


@PROPERTY
@given(problems(), st.sampled_from(RANK_DEFICIENT))
def test_msign_tangent_qr_rank_deficient(problem, kind):
    # rank-deficient dU or dV: Qd / Qv get arbitrary completion columns, which must not matter
    m, n, r, _, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, _, Q = random_point(gen, m, n, r)
    dU, dV = rank_deficient_tangent(gen, U, Q, kind)
    xi = dense_tangent(U, Q, dU, dV)
    rank = int(torch.linalg.matrix_rank(xi))
    if rank:
        assume(relative_singular_values(xi)[rank - 1] > 1e-4)
    t = geo.msign_tangent_qr(geo.tangent_qr(U, Q, dU, dV))
    assert all(torch.isfinite(x).all() for x in t)
    assert_close(dense_from_qr(U, Q, t), dense_projection(U, Q, dense_msign(xi)))


def test_msign_tangent_qr_keeps_small_nonzero_singular_values():
    gen = torch.Generator().manual_seed(9)
    U, _, Q = random_point(gen, 20, 16, 3)
    dU, dV = random_tangent(gen, U, Q)
    dU = 1e-5 * dU
    dV = dV - Q @ (Q.mT @ dV)
    xi = dense_tangent(U, Q, dU, dV)
    assert relative_singular_values(xi)[5] < 1e-4
    t = geo.msign_tangent_qr(geo.tangent_qr(U, Q, dU, dV))
    assert_close(dense_from_qr(U, Q, t), dense_projection(U, Q, dense_msign(xi, rtol=1e-8)))


@PROPERTY
@given(problems(), st.floats(1e-3, 10.0), st.sampled_from([0.0, 0.01, 0.5]))
def test_retract_qr_is_truncated_svd_of_the_step(problem, lr, wd):
    m, n, r, _, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, V, Q = random_point(gen, m, n, r)
    dU, dV = random_tangent(gen, U, Q)
    X = U @ V.mT
    X_r, S = dense_truncate(X - lr * (dense_tangent(U, Q, dU, dV) + wd * X), r)
    gap = (S[r - 1] - S[r]) / S[0] if S.numel() > r else S[r - 1] / S[0]
    assume(gap > 1e-4 and S[r - 1] / S[0] > 1e-4)
    U_new, V_new, Q_new = geo.retract_qr(U, V, Q, geo.tangent_qr(U, Q, dU, dV), lr, wd)
    assert U_new.shape == (m, r) and V_new.shape == (n, r) and Q_new.shape == (n, r)
    assert_orthonormal_columns(U_new)
    assert_close(U_new @ V_new.mT, X_r)
    # Q_new: the positive QR basis of V_new (up to round-off, amplified by cond(V_new))
    assert_orthonormal_columns(Q_new)
    assert_close(Q_new, geo.orthonormal_basis(V_new), 1e-8)
    # and the literal retraction gives the same point
    U_lit, V_lit = geo.retract(U, V, Q, dU, dV, lr, wd)
    assert_close(U_lit @ V_lit.mT, X_r)


def test_retract_qr_degenerate_steps_keep_the_gauge():
    # X = 0 (V = 0): a zero step, and a step of rank 1 < r. The extra singular vectors are
    # arbitrary there; U must stay orthonormal and Q must be an orthonormal basis containing V.
    gen = torch.Generator().manual_seed(11)
    m, n, r = 14, 10, 3
    U = torch.linalg.qr(randn(gen, m, r)).Q
    Q = torch.linalg.qr(randn(gen, n, r)).Q
    V = torch.zeros(n, r, dtype=F64)
    zero = geo.tangent_qr(U, Q, torch.zeros(m, r, dtype=F64), torch.zeros(n, r, dtype=F64))
    dU, dV = random_tangent(gen, U, Q)
    rank1 = geo.tangent_qr(U, Q, torch.zeros(m, r, dtype=F64), dV[:, :1] @ randn(gen, 1, r))
    for t, lr in ((zero, 0.3), (rank1, 0.3), (geo.tangent_qr(U, Q, dU, dV), 0.0)):
        U_new, V_new, Q_new = geo.retract_qr(U, V, Q, t, lr)
        assert all(torch.isfinite(x).all() for x in (U_new, V_new, Q_new))
        assert_orthonormal_columns(U_new)
        assert_orthonormal_columns(Q_new)
        assert_close(Q_new @ (Q_new.mT @ V_new), V_new)
        X_r, _ = dense_truncate(-lr * dense_from_qr(U, Q, t), r)
        assert_close(U_new @ V_new.mT, X_r)


@PROPERTY
@given(problems(), st.integers(1, 3))
def test_structured_batched_equals_loop(problem, batch):
    m, n, r, _, seed = problem
    gen = torch.Generator().manual_seed(seed)
    U, V, Q = random_point(gen, m, n, r, batch=(batch,))
    dU, dV = random_tangent(gen, U, Q)
    t = geo.tangent_qr(U, Q, dU, dV)
    o = geo.msign_tangent_qr(t)
    U_new, V_new, _ = geo.retract_qr(U, V, Q, o, 0.2, 0.01)
    for i in range(batch):
        ti = geo.tangent_qr(U[i], Q[i], dU[i], dV[i])
        assert_close(dense_from_qr(U, Q, t)[i], dense_from_qr(U[i], Q[i], ti))
        oi = geo.msign_tangent_qr(ti)
        assert_close(dense_from_qr(U, Q, o)[i], dense_from_qr(U[i], Q[i], oi))
        Ui, Vi, _ = geo.retract_qr(U[i], V[i], Q[i], oi, 0.2, 0.01)
        assert_close(U_new[i] @ V_new[i].mT, Ui @ Vi.mT)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_structured_float32_matches_float64_definitions(seed):
    # float32 runs the 2r x 2r SVDs as float64 Gram eigh; the float64 reference uses the very
    # same (rounded) inputs, so what is left is float32 round-off
    gen = torch.Generator().manual_seed(seed)
    m, n, r, batch = 40, 30, 4, (3,)
    U, V, Q = random_point(gen, m, n, r, batch=batch)
    dU, dV = random_tangent(gen, U, Q)
    U32, V32, Q32, dU32, dV32 = (x.to(torch.float32) for x in (U, V, Q, dU, dV))
    U, V, Q, dU, dV = (x.to(F64) for x in (U32, V32, Q32, dU32, dV32))
    xi = dense_tangent(U, Q, dU, dV)
    assert (relative_singular_values(xi)[..., 2 * r - 1] > 1e-2).all()
    t = geo.tangent_qr(U32, Q32, dU32, dV32)
    assert t.Qd.dtype == torch.float32
    o = geo.msign_tangent_qr(t)
    assert o.A.dtype == torch.float32
    expected = dense_projection(U, Q, dense_msign(xi))
    assert_close(dense_from_qr(U, Q, geo.TangentQR(*(x.to(F64) for x in o))), expected, 1e-5)
    lr, wd = 0.3, 0.01
    U_new, V_new, Q_new = geo.retract_qr(U32, V32, Q32, o, lr, wd)
    assert U_new.dtype == V_new.dtype == Q_new.dtype == torch.float32
    X = U @ V.mT
    step = X - lr * (dense_from_qr(U, Q, geo.TangentQR(*(x.to(F64) for x in o))) + wd * X)
    X_r, S = dense_truncate(step, r)
    assert ((S[..., r - 1] - S[..., r]) / S[..., 0] > 1e-2).all()
    assert_close((U_new @ V_new.mT).to(F64), X_r, 1e-5)
    assert_orthonormal_columns(U_new.to(F64), 1e-6)
    assert_orthonormal_columns(Q_new.to(F64), 1e-6)


def test_cholesky_qr_accepts_only_nearly_orthonormal_matrices():
    gen = torch.Generator().manual_seed(12)
    Y = torch.linalg.qr(randn(gen, 2, 20, 4)).Q + 1e-3 * randn(gen, 2, 20, 4)
    Rinv, R = geo._cholesky_qr(Y)
    assert_orthonormal_columns(Y @ Rinv)
    assert_close(Y @ Rinv @ R, Y)
    assert (torch.diagonal(R, dim1=-2, dim2=-1) > 0).all()
    Y[1, :, 3] = Y[1, :, 2]  # one batch element rank-deficient: the whole batch falls back
    assert geo._cholesky_qr(Y) is None
    assert geo._cholesky_qr(2.0 * torch.linalg.qr(randn(gen, 20, 4)).Q) is None


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_retract_qr_householder_fallback(monkeypatch, dtype):
    # the branch taken when a Cholesky-QR step is refused (degenerate steps) gives the same point
    gen = torch.Generator().manual_seed(13)
    U, V, Q = random_point(gen, 15, 11, 3, batch=(2,))
    dU, dV = random_tangent(gen, U, Q)
    U, V, Q, dU, dV = (x.to(dtype) for x in (U, V, Q, dU, dV))
    t = geo.msign_tangent_qr(geo.tangent_qr(U, Q, dU, dV))
    fast = geo.retract_qr(U, V, Q, t, 0.2, 0.01)
    monkeypatch.setattr(geo, "_cholesky_qr", lambda Y: None)
    slow = geo.retract_qr(U, V, Q, t, 0.2, 0.01)
    tol = 1e-10 if dtype == F64 else 1e-5
    assert_close((slow[0] @ slow[1].mT).to(F64), (fast[0] @ fast[1].mT).to(F64), tol)
    assert_orthonormal_columns(slow[0].to(F64), tol)
    assert_close((slow[2] @ slow[2].mT).to(F64), (fast[2] @ fast[2].mT).to(F64), tol)
