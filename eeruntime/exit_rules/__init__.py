"""Exit rules of the text early-exit papers, as runtime criteria usable with ``ee.calibrate``.

    rt = ee.EERuntime(model, thresholds=2, criterion=ee.exit_rules.Patience())      # PABEE, per row
    lte = ee.exit_rules.LearnedExit(hidden_size); ee.train.learned_exit(model, lte, data, 5, 1e-3)
    rt = ee.EERuntime(model, thresholds=0.5, criterion=lte)                          # BERxiT

DeeBERT's rule is the built-in ``"entropy"`` criterion; its two-stage highway training is
:func:`eeruntime.train.two_stage`. Both criteria here are *per-exit scorers* (see
:mod:`eeruntime.criteria`): a row leaves early exit k when its score >= the threshold of exit k.
"""

from .learned import LearnedExit, pool_features
from .patience import Patience, patience_scores_ref, whole_batch_patience

__all__ = ["Patience", "patience_scores_ref", "whole_batch_patience", "LearnedExit", "pool_features"]
