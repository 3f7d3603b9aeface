"""Evaluation: PCK with every protocol option, named paper protocols, one loop for every
dataset, and the reports (``results.json``, ``results.md``, tables, plots).

- :mod:`diffeat.eval.pck`: pure numpy PCK (thresholds, ``<=`` / ``<``, averages);
- :mod:`diffeat.eval.protocols`: presets that reproduce published numbers;
- :mod:`diffeat.eval.runner`: ``evaluate(pipeline, dataset, ...)``;
- :mod:`diffeat.eval.report` and :mod:`diffeat.eval.plots`: outputs.
"""

from __future__ import annotations

from diffeat.eval.pck import ScoredPair, correct, distances, summarize, threshold_of
from diffeat.eval.protocols import PROTOCOLS, PCKProtocol, get_protocol

__all__ = [
    "PROTOCOLS",
    "PCKProtocol",
    "ScoredPair",
    "correct",
    "distances",
    "get_protocol",
    "summarize",
    "threshold_of",
]
