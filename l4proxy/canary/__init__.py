"""``l4proxy canary``: progressive delivery with automatic rollback.

* ``_analysis``: the rollout as a pure state machine (steps, checks, halt,
  threshold, promote, rollback, resume); table-tested.
* ``_metrics``: per-version samples from sidecars' ``/stats`` or Prometheus.
* ``command``: the command itself (display, state file, rule writes, signals).
* ``kube``: the same rollout on a ConfigMap through the Kubernetes API.
"""
