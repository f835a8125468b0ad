"""Webhooks: a POST of JSON to a URL a request names, when a run or an experiment ends.

The URL is untrusted: http or https only, to a host the operator allows
(`MECBENCH_CONTROLLER_WEBHOOK_HOSTS`: host names, addresses or `host:port`, or `*` for any), no
redirect followed (a 3xx is recorded as the answer), a timeout on the whole call. A webhook
never decides a run's fate: its delivery, or why there was none, is recorded on the run or the
experiment (`WebhookDelivery`) and logged.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from mecbench.core.logging import get_logger
from mecbench.v1 import controller_pb2

log = get_logger("mecbench.controller.webhooks")

HOSTS_SETTING = "MECBENCH_CONTROLLER_WEBHOOK_HOSTS"
MAX_URL_LENGTH = 2048
TIMEOUT_S = 10.0


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a webhook, whoever runs the controller; None when it can."""
    if len(url) > MAX_URL_LENGTH:
        return f"at most {MAX_URL_LENGTH} characters"
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"the scheme must be http or https, not {parts.scheme or 'none'!r}"
    if not parts.hostname:
        return "must name a host (http://host:port/path)"
    if parts.username or parts.password:
        return "must not carry credentials"
    if port == 0:
        return "the port must be 1-65535"
    return None


def host_problem(url: str, allowed: Sequence[str]) -> str | None:
    """Why the operator's allowlist refuses the (well-formed) `url`; None when it allows it."""
    if not allowed:
        return f"this controller sends no webhooks (its operator has set no {HOSTS_SETTING})"
    if "*" in allowed:
        return None
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    if any(entry.strip().lower() in (host, f"{host}:{port}", f"[{host}]:{port}") for entry in allowed):
        return None
    return f"host {host}:{port} is not one this controller's operator allows ({HOSTS_SETTING})"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is the receiver's answer, never a second request somewhere else."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


def deliver(url: str, document: dict[str, object], allowed: Sequence[str]) -> controller_pb2.WebhookDelivery:
    """POST `document` to `url`; what happened, never an exception."""
    delivery = controller_pb2.WebhookDelivery(url=url)
    delivery.sent_at.GetCurrentTime()
    problem = url_problem(url) or host_problem(url, allowed)
    if problem is not None:
        delivery.error = problem
        log.warning("webhook_refused", url=url, error=problem)
        return delivery
    request = urllib.request.Request(
        url, data=json.dumps(document).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with _OPENER.open(request, timeout=TIMEOUT_S) as response:
            delivery.status_code = response.status
    except urllib.error.HTTPError as exc:  # 3xx (not followed), 4xx, 5xx
        delivery.status_code = exc.code
        delivery.error = f"the receiver answered {exc.code} {exc.reason}"
    except (OSError, ValueError) as exc:  # refused, timed out, TLS, a URL urllib cannot use
        delivery.error = f"not delivered: {exc}"
    if delivery.error:
        log.warning("webhook_failed", url=url, error=delivery.error)
    else:
        log.info("webhook_delivered", url=url, status=delivery.status_code)
    return delivery
