"""The ``riemannlora bench`` harness: one training loop, many optimizers, real models and data.

* :mod:`~riemannlora.bench.methods` -- the compared methods, their settings and learning rates;
* :mod:`~riemannlora.bench.data` -- the embedded data sets and the loader of local files and
  hub ids (Hugging Face ``datasets``);
* :mod:`~riemannlora.bench.tasks` -- the built-in tasks' splits, tokenization and scoring
  helpers (answer extraction, option likelihood, greedy decoding);
* :mod:`~riemannlora.bench.userdata` -- a user's data set as a task (``--data``);
* :mod:`~riemannlora.bench.workloads` -- tasks: model, LoRA layers, batches, presets;
* :mod:`~riemannlora.bench.scoring` -- each task's final metrics on its test split;
* :mod:`~riemannlora.bench.metrics` -- BLEU, ROUGE-L and NIST;
* :mod:`~riemannlora.bench.runner` -- the training loop, the run cache and the sweep;
* :mod:`~riemannlora.bench.measure` -- peak memory, synchronized timing and the run's build;
* :mod:`~riemannlora.bench.summary` -- per-method summaries;
* :mod:`~riemannlora.bench.report` -- ``results.json``, ``results.md`` and plots;
* :mod:`~riemannlora.bench.assets` -- the real models, found offline or downloaded;
* :mod:`~riemannlora.bench.diffusion` -- the small diffusion model, pretrained here, and its
  DreamBooth task.

The command line (:mod:`riemannlora.cli`) ties them together.
"""

from riemannlora.bench.methods import METHODS, available_methods, lr_grid
from riemannlora.bench.runner import RunCache, RunConfig, run_sweep, train
from riemannlora.bench.workloads import WORKLOADS

__all__ = [
    "METHODS",
    "WORKLOADS",
    "RunCache",
    "RunConfig",
    "available_methods",
    "lr_grid",
    "run_sweep",
    "train",
]
