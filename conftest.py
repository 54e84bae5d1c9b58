"""Registers the blip-triton-bench pytest plugin; everything else lives in fixtures/."""

pytest_plugins = ["fixtures.plugin"]
