"""`ray_environment(options)`: the environment variables a local Ray started by `llorch serve
--replicas` needs. Ray Serve reads its switches once, when a process imports `ray.serve`, and
a local Ray's processes inherit the driver's environment, so `serve.main` sets these before it
imports Ray. No Ray here (the single-process path imports nothing of Ray).
"""

from __future__ import annotations

import os
import socket

from serve.options import ServeOptions

PROXY_READY_S = 30  # each of Ray Serve's 3 readiness checks of its proxy (Ray's default: 5 s)


def ray_environment(options: ServeOptions) -> dict[str, str]:
    """Variables to set for `options` (names from `ray/serve/_private/constants.py`, 2.60).

    - `RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S` (unless already set): Ray Serve kills its HTTP
      proxy after 3 readiness checks of 5 s and `serve.start` fails; on a busy machine (2
      cores and a test suite) the proxy took longer than 15 s to start.
    - `--ray-ingress haproxy`: HAProxy in front of direct-ingress replicas, with the request
      body forwarded to the ingress request router (prefix routing reads the prompt), and
      HAProxy's stats page and Prometheus exporter on free ports (Ray's fixed 8404 and 9101
      would collide with a second server on the machine).
    """
    env: dict[str, str] = {}
    if options.ray_address is None and "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S" not in os.environ:
        env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = str(PROXY_READY_S)
    if options.ray_ingress == "haproxy":
        env.update({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                    "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1"})
        for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            if name not in os.environ:
                env[name] = str(_free_port())
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
