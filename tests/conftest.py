"""Shared fixtures for the nursery_down test suite."""

from __future__ import annotations
