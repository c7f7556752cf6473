"""Old import path of :mod:`eeruntime.eenet` (EENet's learned per-exit scorers), kept so that
``from eeruntime.scorers import EENetScorer`` keeps working; new code imports ``eeruntime.eenet``.
Saved runtimes never name this path: they name the criterion ``"eenet"`` (docs/design.md, "Saving")."""

from .eenet import DEFAULT_TOP_K, EENetScorer, eenet_losses, exit_features, train_eenet_scorer

__all__ = ["DEFAULT_TOP_K", "EENetScorer", "eenet_losses", "exit_features", "train_eenet_scorer"]
