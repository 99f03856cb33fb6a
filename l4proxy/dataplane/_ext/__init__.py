"""Compiled twins of l4proxy's hot modules (built from ext/*.pyx by setup.py).

Never import from here directly: use ``l4proxy.dataplane.peek`` and ``l4proxy.dataplane.pump``,
which pick the compiled module or its pure-Python twin in one place.
"""
