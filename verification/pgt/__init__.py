"""Verification of the PowerGrad Transform: trajectory equivalence cases, the reference
implementation's reconstruct-from-gradient hook (negative control), hypothesis strategies."""
from .reference import reference_reconstruct_from_grad_hook
from .suite import CURVE_COLUMNS, SUMMARY_COLUMNS, run_pgt_section

__all__ = ["run_pgt_section", "reference_reconstruct_from_grad_hook", "SUMMARY_COLUMNS", "CURVE_COLUMNS"]
