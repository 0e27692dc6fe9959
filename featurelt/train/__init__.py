"""Training from cached features (``head.py``); backbone jobs live in their own modules."""
from __future__ import annotations

__all__ = ["head"]
