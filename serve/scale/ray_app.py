"""`run(options, model_name)`: serve on Ray Serve, N replicas of the single-process app.

Starts a local Ray (or joins `--ray-address`), deploys

    Ingress × --ingress-replicas (no CPU) ─► Replica × N (num_cpus = --threads,
         │  routers share the PrefixTable actor       num_gpus = --gpus-per-replica)

behind Ray Serve's HTTP proxy on `--host/--port`, and waits. With `--ray-ingress haproxy` the
replicas are `serve.scale.direct.DirectReplica`s that Ray's HAProxy reaches directly, picked
by the `Route` deployment (no Ingress). SIGTERM/SIGINT drain: the
ingress answers 503 to new requests, running ones get `--drain-timeout` seconds (a second
signal cuts that short), then each replica ends what is left with an error event (told
through the `Registry` at its next beat), the application is deleted (each replica stops
its engine) and a Ray started here is shut down; a third signal kills a Ray started here
(every process of it) and exits at once (status 128 + the signal). `application(options, model_name, registry, table)` is the bound
application alone, for `serve.run` elsewhere.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import replace
from typing import Any

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, HTTPOptions, RequestRouterConfig
from ray.serve.schema import LoggingConfig

from serve.errors import StartupError
from serve.options import ServeOptions
from serve.scale.coalesce import DEFAULT_CHUNK_RATE
from serve.scale.direct import DirectReplica, route_deployment
from serve.scale.ingress import Ingress
from serve.scale.prefix_table import PrefixTable
from serve.scale.registry import BEAT_S, Registry
from serve.scale.replica import Replica

log = logging.getLogger("serve.scale.ray_app")

PREFIX_ROUTER = "serve.scale.router.PrefixAffinityRouter"
NAMESPACE = "llorch"  # the Registry and PrefixTable actors' Ray namespace
END_WAIT_S = 10.0  # after the drain: how long the replicas get to end what is left


def replica_threads(options: ServeOptions, cpus: int) -> int:
    """ORT threads (= Ray CPUs, = pinned cores) per CPU replica: `--threads`, else this
    machine's CPUs shared evenly by `--replicas` or `--max-replicas` (at least 1)."""
    if options.threads:
        return options.threads
    return max(1, cpus // (options.replicas or options.max_replicas or 1))


def ingress_replicas(options: ServeOptions) -> int:
    """Ingress replicas: `--ingress-replicas`, else one per (most) engine replica(s)."""
    return options.ingress_replicas or options.replicas or options.max_replicas or 1


def application(options: ServeOptions, model_name: str, registry: Any,
                table: str | None = None) -> Any:
    """The Ray Serve application: the ingress bound to the replica deployment.

    Args:
        options: the server's options; the replicas get them with `threads` resolved.
        model_name: the served model id.
        registry: handle of the `Registry` actor (the caller names and owns it).
        table: name of the `PrefixTable` actor (in `NAMESPACE`) the ingresses' routers
            share; None: each router keeps its own.
    """
    cpu = options.provider == "cpu"
    threads = replica_threads(options, len(os.sched_getaffinity(0)))
    gpus = options.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if options.provider in ("cuda", "CUDAExecutionProvider") else 0.0
    logs = LoggingConfig(log_level=options.log_level.upper())  # Ray's access log: info
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.replicas is None:
        least = 1 if options.min_replicas is None else options.min_replicas  # 0: scale to zero
        scaling = {"autoscaling_config": AutoscalingConfig(
            min_replicas=least, max_replicas=options.max_replicas,
            initial_replicas=max(1, least),  # ready to answer at startup
            target_ongoing_requests=options.target_ongoing_requests or options.max_batch)}
    direct = options.ray_ingress == "haproxy"
    replica = serve.deployment(serve.ingress()(DirectReplica) if direct else Replica,
                               name="llorch-replica").options(
        # Ray's default (5) would throttle a batching engine: slots + its own queue.
        max_ongoing_requests=options.max_batch + options.max_queue,
        ray_actor_options={"num_cpus": threads if cpu else 1, "num_gpus": gpus},
        request_router_config=RequestRouterConfig(  # least-loaded: Ray's default router
            request_router_class=PREFIX_ROUTER,
            # The HAProxy route is the only router that picks: its own table, no actor call.
            request_router_kwargs={"saturation": options.max_batch,
                                   "table": None if direct else table, "namespace": NAMESPACE,
                                   **({"picks_only": True} if direct else {})},
        ) if options.routing == "prefix" else RequestRouterConfig(),
        graceful_shutdown_timeout_s=options.drain_timeout + 5.0, graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5.0, logging_config=logs,
        **scaling)
    ingress = serve.deployment(serve.ingress()(Ingress), name="llorch-ingress").options(
        num_replicas=ingress_replicas(options), max_ongoing_requests=100_000,
        ray_actor_options={"num_cpus": 0},
        logging_config=logs)
    replica_options = replace(options, threads=threads if cpu else options.threads)
    if direct:  # HAProxy asks the Route which replica; the replicas answer the clients
        bound = replica.bind(replica_options, model_name, registry)
        return bound._with_ingress_request_router(route_deployment().bind(bound))
    return ingress.bind(replica.bind(replica_options, model_name, registry), registry, options)


def run(options: ServeOptions, model_name: str) -> None:
    """Serve until SIGTERM/SIGINT, then drain (see the module docstring).

    Raises:
        StartupError: Ray cannot start or be joined, or the replicas fail to start.
    """
    local = options.ray_address is None
    try:
        if local:
            # Ray's own processes share our process group: a Ctrl-C or `timeout` signals the
            # whole group and would kill them before we drained. They start with both
            # signals blocked (a mask survives exec), so only this process acts on them.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                         num_cpus=len(os.sched_getaffinity(0)))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        else:
            ray.init(address=options.ray_address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = "" if local or os.environ.get("RAY_AUTH_MODE") else (
            "; a cluster with token authentication (ray start's default) also needs "
            "RAY_AUTH_MODE=token here and its token in ~/.ray/auth_token or $RAY_AUTH_TOKEN")
        raise StartupError(f"cannot start or join Ray ({options.ray_address or 'local'}): "
                           f"{exc}{hint}") from None
    stop, cut = threading.Event(), threading.Event()  # the first signal drains, a second cuts it short
    received = []

    def on_signal(sig: int, _frame: Any) -> None:
        received.append(sig)
        if len(received) >= 3:
            _exit_now(sig, local)
        (cut if stop.is_set() else stop).set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        table = f"llorch-prefixes-{model_name}"
        try:  # both live as long as this driver holds their handles
            registry = ray.remote(Registry).options(
                num_cpus=0, name=f"llorch-registry-{model_name}", namespace=NAMESPACE).remote()
            prefixes = ray.remote(PrefixTable).options(
                num_cpus=0, name=table, namespace=NAMESPACE).remote()
        except ValueError:  # the name is taken
            raise StartupError(f"another llorch serve of '{model_name}' runs on this Ray "
                               "cluster; stop it or pass another --model-name") from None
        serve.start(http_options=HTTPOptions(host=options.host, port=options.port))
        try:
            serve.run(application(options, model_name, registry, table), name=model_name,
                      route_prefix="/", blocking=False)
        except Exception as exc:
            raise StartupError(f"the replicas did not start: {exc}") from None
        log.info("Ray cluster at %s", ray.get_runtime_context().gcs_address)
        log.info("serving %s as '%s' on http://%s:%d with %s", options.model_dir, model_name,
                 options.host, options.port,
                 f"{options.replicas} replicas" if options.replicas else
                 f"{options.min_replicas or 1}-{options.max_replicas} replicas (autoscaling)")
        log.info("each replica runs its engine %s", "in a child process (--engine-process)"
                 if options.engine_process_in_effect else "in its own process (--no-engine-process)")
        if options.ray_ingress == "haproxy":
            log.info("clients reach the replicas through HAProxy (its stats page on port %s, "
                     "its Prometheus metrics on port %s, all interfaces)",
                     os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", "8404"),
                     os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT", "9101"))
        else:
            log.info("%d ingress replicas; streams coalesced to ~%g chunks/s per replica",
                     ingress_replicas(options), DEFAULT_CHUNK_RATE
                     if options.stream_chunk_rate is None else options.stream_chunk_rate)
        while not stop.wait(0.5):
            pass
        log.info("draining (%g s for running requests)", options.drain_timeout)
        ray.get(registry.set_draining.remote())
        deadline = time.monotonic() + options.drain_timeout
        time.sleep(2 * BEAT_S)  # replicas' counts are a beat old: let a just-started one show
        while time.monotonic() < deadline and not cut.is_set() and _requests_in_flight(registry):
            time.sleep(0.2)
        if _requests_in_flight(registry):
            # The replicas end the rest with an error event (each at its next beat), as a
            # single process does; else they ran on until Ray's graceful shutdown killed them
            # (--drain-timeout + 5 s later) and their clients saw the connection cut.
            log.info("ending the requests still running")
            ray.get(registry.end_requests.remote())
            ends = time.monotonic() + END_WAIT_S
            time.sleep(2 * BEAT_S)  # told at one beat, their counts in the next
            while time.monotonic() < ends and _requests_in_flight(registry):
                time.sleep(0.2)
        serve.delete(model_name)
        ray.kill(prefixes)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if local:
            serve.shutdown()
            ray.shutdown()


def _exit_now(sig: int, local: bool) -> None:
    """A third signal: exit at once with status 128 + `sig`, as a single process does. A Ray
    started here is killed first, every process of it (this process's descendants: GCS,
    raylet, its agents and workers, the replicas and HAProxy among them) with SIGKILL, else
    they would outlive this process: `ray._private` node's `kill_all_processes` leaves the
    raylet's dashboard and runtime-env agents running (15 s and more, measured)."""
    log.warning("%s a third time: exiting now (status %d)%s", signal.Signals(sig).name, 128 + sig,
                ", killing the local Ray" if local else "")
    if local:
        for pid in _descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # already gone
                pass
    logging.shutdown()
    os._exit(128 + sig)


def _descendants(root: int) -> list[int]:
    """The pids of every living descendant of process `root` (Linux: from /proc; elsewhere
    none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _requests_in_flight(registry: Any) -> int:
    snapshot = ray.get(registry.snapshot.remote())
    return sum(health.get("requests") or 0 for _, health, _ in snapshot.values())
