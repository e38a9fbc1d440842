"""Fuzzing of every decoder that sees untrusted bytes (see docs/security.md, "Fuzzing").

:mod:`fuzz.targets` holds one function per decoder that feeds it one input and lets
only the decoder's documented errors pass; :mod:`fuzz.seeds` builds valid inputs from
the real encoders and captured kernel traffic. The ``fuzz_*.py`` scripts run them under
atheris (``make fuzz``); ``tests/test_fuzz_decoders.py`` runs them under hypothesis.
"""
