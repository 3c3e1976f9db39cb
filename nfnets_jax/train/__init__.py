"""The NFNet trainer: data-parallel (`jax.pmap`) training driven by ml-collections configs.

Modules, in the order a run uses them:
  recipe: the config read once into a typed `Recipe` (plan, schedule, optimizer,
    precision, input iterators).
  resume: the workdir's config record, the resume check, restore-or-create, pretrained
    init.
  steps: the pure pieces of a step (state, loss, gradients, train step, eval logits).
  loop: `train_and_evaluate(config, workdir)`.
"""

from nfnets_jax.train.loop import NonFiniteLossError, train_and_evaluate
from nfnets_jax.train.resume import ConfigMismatchError

__all__ = ["ConfigMismatchError", "NonFiniteLossError", "train_and_evaluate"]
