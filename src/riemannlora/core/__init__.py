"""The math of the package as pure functions of tensors (this package imports only torch).

* :mod:`~riemannlora.core.geometry` -- the manifold of fixed-rank matrices on factors: tangent
  vectors, projection, msign, retraction and transport, literal and structured;
* :mod:`~riemannlora.core.preconditioner` -- the r x r Riemannian preconditioner of LoRA pairs;
* :mod:`~riemannlora.core.manifold_step` -- one Riemannion / Riemannian-SGD step of a stack of
  equal-shape layers, with its momentum kept in the bases of its direction;
* :mod:`~riemannlora.core.rows` -- what a computation over tall matrices asks where their rows,
  possibly sharded over processes, must meet (a sum, a QR), and the one-process answers.
"""
