"""The contract's one error type."""

from __future__ import annotations

__all__ = ["ContractError"]


class ContractError(ValueError):
    """A member or predictions table breaks the contract; the message says how to fix it."""
