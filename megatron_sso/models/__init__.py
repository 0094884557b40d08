"""Small pure-PyTorch models for the demo, the studies in scripts/ and the tests.

:mod:`.tiny_gpt` -- a tiny GPT trained on the Python standard library's own sources (nothing
downloaded). Imports ``ops`` and ``optim`` only; nothing here imports Megatron.
"""
