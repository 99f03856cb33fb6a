"""Kubernetes object names (RFC 1123), for every command that checks one.

It imports nothing but ``re`` and ``argparse``: the supervisor checks
``--namespace`` with it and loads none of the rule code.
"""

from __future__ import annotations

import argparse
import re

# a namespace, a Service: a DNS label
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# a ConfigMap and most other objects: a DNS subdomain
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def namespace_arg(value: str) -> str:
    """``--namespace``'s type for every command that takes one (argparse: a
    value that is no namespace name exits 2 naming the option)."""
    if not DNS1123_LABEL.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a namespace name (a DNS label: lower-case letters, digits, '-')"
        )
    return value
