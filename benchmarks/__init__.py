"""The pytest-driven benchmark runner (conftest.py) and its test modules.

A package so that pytest puts the checkout's root on sys.path: `pytest benchmarks` then imports
`cxr` from this checkout without an install, and module names cannot clash with tests/. Device
helpers (resolve, synchronize, name) are cxr.env's.
"""
