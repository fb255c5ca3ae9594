"""Tests of the emulators themselves (the emulators live in the top-level ``emulators`` package)."""
