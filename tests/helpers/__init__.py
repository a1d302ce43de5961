"""Shared test code, imported by the test modules as `helpers.<module>` (tests/ is on sys.path: pytest's rootdir
insertion and conftest.py put it there; the scripts in tests/scripts/ get it through PYTHONPATH from the tests that
launch them). Test modules never import each other: what two of them share lives here."""
