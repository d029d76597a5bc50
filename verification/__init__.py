"""The equivalence engine, strategies and suites. ``verification.verify_model`` (whole models)
is imported on first use, so importing a submodule stays light."""
from __future__ import annotations

from typing import Any

__all__ = ["verify_model"]


def __getattr__(name: str) -> Any:
    if name == "verify_model":
        from verification.model import verify_model

        return verify_model
    raise AttributeError(f"module 'verification' has no attribute {name!r}")
