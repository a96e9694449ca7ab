"""DLMI: language-model inversion by end-to-end differentiation (prompt from a target output)."""

from lit_inversion.dlmi.algorithm import DlmiBatch
from lit_inversion.dlmi.batch import DlmiResult, StepStats, greedy_decode
from lit_inversion.dlmi.config import (METHODS, DlmiConfig, GbdaConfig, GcgConfig, OutputConfig, ReinforceConfig,
                                       method_config)
from lit_inversion.dlmi.pool import TargetPool, invert_outputs, make_batch, run_pool
from lit_inversion.dlmi.api import invert_output
from lit_inversion.dlmi.data import OutputTarget, OutputTargetsDataModule
from lit_inversion.dlmi.module import DlmiModule

__all__ = ["DlmiModule", "OutputTarget", "OutputTargetsDataModule", "invert_output", "DlmiBatch", "DlmiConfig", "DlmiResult", "StepStats", "greedy_decode", "invert_outputs", "run_pool",
           "TargetPool", "METHODS", "OutputConfig", "GbdaConfig", "GcgConfig", "ReinforceConfig", "make_batch",
           "method_config",
           "make_difficulty_targets", "perplexity"]


def __getattr__(name: str):
    # Lazy, so `python -m lit_inversion.dlmi.targets` does not import the module twice.
    if name in ("make_difficulty_targets", "perplexity"):
        from lit_inversion.dlmi import targets

        return getattr(targets, name)
    raise AttributeError(name)
