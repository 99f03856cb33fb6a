"""Kubernetes object names (RFC 1123), for every command that checks one.

It imports nothing but ``re``: the supervisor checks ``--namespace`` with it
and loads none of the rule code.
"""

from __future__ import annotations

import re

# a namespace, a Service: a DNS label
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# a ConfigMap and most other objects: a DNS subdomain
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
