"""``l4proxy demo`` and its lab; nothing in the sidecar imports this package.

* ``tutorial``: Istio's request-routing tutorial, step by step;
* ``podnet``: pods as network namespaces on a bridge (also the tests' and the
  benchmark's topology);
* ``bootcamp``: the tutorial's app (``python -m l4proxy.demo.bootcamp``).
"""
