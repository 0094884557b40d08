"""Hooks the test suite hands to Bridge ranks by name (``"module:function"``), never product code.

:mod:`.bridge_hooks` -- the same initial weights for every TP size, a layer check probe;
:mod:`.dp_hooks` -- data-parallel probes and a NaN injected on one rank. They run inside spawned
ranks, so they live in the installed package; nothing in the product imports this package
(``tests/test_layering.py``).
"""
