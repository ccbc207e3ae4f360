"""The PurifiedLearning recipe, built on the op's public API (:class:`purified_ops.PurifyLayer`)
and nothing below it: networks with a task-irrelevant branch whose output purifies the features
or the input, their losses and training (:mod:`purified_ops.recipe.learning`), and the digits
demo behind ``purified-ops demo`` (:mod:`purified_ops.recipe.demo`).

    from purified_ops.recipe import PurifiedNet, fit, evaluate
"""
from . import learning
from .learning import *  # noqa: F401,F403  (the names listed in learning.__all__)

__all__ = list(learning.__all__)
