"""l4proxy's benchmark harness: ``make bench`` / ``python -m bench``.

Measures l4proxy against its peers — HAProxy (TCP mode), nginx stream, Envoy
(tcp_proxy and HTTP weighted_clusters) and a direct wrk → backend run — with
wrk, keep-alive and ``Connection: close``, in two placements: a gateway on
loopback and a sidecar behind l4proxy-init's REDIRECT in network namespaces.

Modules, one concern each:

- :mod:`bench.provision`: installs the Debian peers and pip packages when missing
- :mod:`bench.process`: started programs and their bill (CPU, RSS)
- :mod:`bench.peers`: configs and processes of nginx, HAProxy and Envoy
- :mod:`bench.rules`: the rule files l4proxy runs with (50/50 RouteRule)
- :mod:`bench.scenarios`: the loopback and sidecar beds and their targets
- :mod:`bench.wrk`: wrk's command line and report
- :mod:`bench.measure`: interleaved rounds and medians
- :mod:`bench.memory`: RSS holding idle connections
- :mod:`bench.profile`: py-spy under close-mode load, summarized
- :mod:`bench.report`: the table, the targets, the JSON
"""
