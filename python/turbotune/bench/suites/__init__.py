"""Benchmark suites: every module here registers one with ``@register_suite``."""
