"""Helpers of the end-to-end test that renders gpumesh output in Neuroglancer (headless Chromium)."""
