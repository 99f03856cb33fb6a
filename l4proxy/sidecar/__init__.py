"""The sidecar process: ``l4proxy run``.

* ``run``: the command (options, binding, logging, the start-up order);
* ``supervisor``: binds nothing itself, spawns and watches the workers;
* ``worker``: one event loop per worker, the I/O shell around
  :func:`l4proxy.rules.classify.classify` that connects upstream and hands
  both sockets to the data plane;
* ``channel``: the supervisor-worker protocol (frames, request ids), both ends;
* ``signals``: SIGHUP/SIGTERM at start-up, before the loop owns them;
* ``admin``: ``/stats``, ``/ready``, ``/rules`` on 127.0.0.1:15000;
* ``istio_metrics``: Istio's standard metrics in ``/stats``: the families,
  the histogram's buckets, and where each label's value comes from.
"""
