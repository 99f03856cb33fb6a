"""Kubernetes object names (RFC 1123), for every command that checks one.

It imports nothing but ``re``, ``json`` and ``argparse``: the supervisor
checks ``--namespace`` with it and loads none of the rule code. The pod's
labels (``--pod-labels``, ``--pod-labels-file``) are read here too, so that
``l4proxy run`` and ``l4proxy validate`` read them alike.
"""

from __future__ import annotations

import argparse
import json
import re

# a namespace, a Service: a DNS label
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# a ConfigMap and most other objects: a DNS subdomain
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# a label's name (an optional DNS prefix and '/', then the name) and value
LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
# what a label name (after its prefix) and a label value are, said in their errors
LABEL_SYNTAX = (
    "at most 63 letters, digits, '-', '_' and '.', beginning and ending with a letter or digit"
)


def namespace_arg(value: str) -> str:
    """``--namespace``'s type for every command that takes one (argparse: a
    value that is no namespace name exits 2 naming the option)."""
    if not DNS1123_LABEL.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a namespace name (a DNS label: lower-case letters, digits, '-')"
        )
    return value


def pod_labels_arg(value: str) -> dict[str, str]:
    """``--pod-labels`` of ``l4proxy run`` and ``l4proxy validate``: ``key=value,...``
    (a key blank but for spaces is no key, and a name or value that is not
    Kubernetes' syntax no label: an error naming the option)."""
    out: dict[str, str] = {}
    for item in filter(None, value.split(",")):
        k, sep, v = item.partition("=")
        k, v = k.strip(), v.strip()
        if not sep or not k:
            raise argparse.ArgumentTypeError(f"expected key=value[,key=value], got {value!r}")
        # a pod's labels are Kubernetes': one that is not (a space-separated
        # list read as one value, say) is a typo that would select nothing
        if not LABEL_KEY.fullmatch(k):
            raise argparse.ArgumentTypeError(
                f"label name {k!r} is not a Kubernetes label name ({LABEL_SYNTAX}, after an "
                f"optional DNS prefix and '/'); expected key=value[,key=value], got {value!r}"
            )
        if not LABEL_VALUE.fullmatch(v):
            raise argparse.ArgumentTypeError(
                f"label {k}={v!r} is not a Kubernetes label value ({LABEL_SYNTAX}, or empty); "
                f"expected key=value[,key=value] (labels separated by ','), got {value!r}"
            )
        out[k] = v
    return out


# A labels file read at most: a pod's whole object is at most 1.5 MiB (etcd's
# request limit), so its labels are less. Read whole, --pod-labels-file
# /dev/zero (or a file that grows) took every process to its memory limit
# (a MemoryError's traceback, or the OOM killer) before a line was parsed.
MAX_LABELS_BYTES = 4 << 20


def pod_labels_file_arg(path: str) -> dict[str, str]:
    """The pod's labels as the Downward API writes them (a ``labels`` file
    of a downwardAPI volume, ``fieldPath: metadata.labels``): one
    ``key="value"`` per line, the value quoted as Go quotes strings
    (``--pod-labels-file`` of ``l4proxy run`` and ``l4proxy validate``)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LABELS_BYTES + 1)
        if len(data) > MAX_LABELS_BYTES:
            raise argparse.ArgumentTypeError(
                f"cannot read {path}: more than {MAX_LABELS_BYTES >> 20} MiB, which no "
                "pod's labels are (is it the Downward API's labels file?)"
            )
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc}") from exc
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, quoted = line.partition("=")
        value = None
        if sep and key and quoted.startswith('"'):
            try:  # (label values are [A-Za-z0-9._-]: JSON reads Go's quoting of them)
                value = json.loads(quoted)
            except ValueError:
                pass
        if not isinstance(value, str):
            raise argparse.ArgumentTypeError(
                f'{path}:{lineno}: expected key="value" (a Downward API labels file), got {line!r}'
            )
        out[key] = value
    return out
