"""The data plane: where a byte goes once the rules have decided.

Every module here is either sans-IO or a thread that owns its sockets; none
reads the rules. Each compiled module ``ext/<name>.pyx`` is built into
``l4proxy.dataplane._ext.<name>`` (its types in ``_ext/<name>.pyi``) and has a
pure-Python twin ``_<name>_py.py`` beside the chooser ``<name>.py``, the only
module the rest of l4proxy imports; :mod:`~l4proxy.dataplane._impl` is the one
place that picks between them (``L4PROXY_NO_EXTENSIONS=1`` forces pure).

* ``pump``: the L4 relay (epoll thread; splice, half-close, resets);
* ``peek``: the HTTP/1.x request-head parser;
* ``framing``: HTTP/1.1 message framing (where bodies end);
* ``_exchange_py``, ``_pool_py``, ``_relay_py``: the per-request relay (a
  sans-IO exchange, upstream pools, and the thread around them; pure for now);
* ``origdst`` (``SO_ORIGINAL_DST``) and ``listener`` (the bound sockets).
"""
