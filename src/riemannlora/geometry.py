"""The fixed-rank geometry under the name the README's API table gives it: an alias of
:mod:`riemannlora.core.geometry`, where it lives."""

from riemannlora.core.geometry import *  # noqa: F403
from riemannlora.core.geometry import __all__  # noqa: F401
