"""Joining Ray the way a job runs: the cluster the job was submitted to, or a local instance.

Every command that starts Ray (``train``, ``pretrain``, ``retrain``, ``ingest``, ``demo``) goes
through :func:`connect`:

- an explicit address (``scaling.address`` / ``--address``; ``auto`` finds a ``ray start`` node on
  this machine) is joined;
- else ``RAY_ADDRESS``, which Ray's job supervisor sets for every job's entrypoint (``ray job
  submit``, a KubeRay ``RayJob``, ``dynamix submit``), is joined;
- only where neither exists is a local instance started (4 logical CPUs on small boxes: see
  docs/stack.md). ``num_cpus`` and the dashboard are settings of a *new* instance: Ray refuses
  them when joining a cluster.

:func:`require_resources` then checks, before anything is placed, that the cluster can hold what the
job asks for (its trainers and labeling actors) and says so in one line when it cannot, instead of
Ray's silent wait for resources.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from dynamix_core.config import ConfigError

log = logging.getLogger("dynamix.ray")

#: logical CPUs of a local instance (workers at 0.5 CPU each leave room for Ray Data and the pool)
LOCAL_MIN_CPUS = 4


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: ``address`` (``auto``: the latest one ``ray start`` started on this machine),
    else ``$RAY_ADDRESS``; None means start a local instance."""
    return address or os.environ.get("RAY_ADDRESS") or None


def connect(address: str | None = None, *, local_cpus: int | None = None, namespace: str = "dynamix") -> str:
    """Join the cluster :func:`cluster_address` names, or start a local instance; returns where
    (``"cluster <address>"`` or ``"local"``). A no-op when Ray is already initialised here."""
    import ray

    from pipelines.console import quiet_ray_libraries, ray_init_kwargs

    if ray.is_initialized():
        return "already connected"
    target = cluster_address(address)
    if target:
        # the cluster brings its own auth mode and token: nothing is set for it here
        ray.init(address=target, namespace=namespace, **ray_init_kwargs(local=False))
        where = f"cluster {target}"
    else:
        # address="local": a new instance even when a `ray start` head runs on this machine (plain
        # ray.init() would join that one, and refuse num_cpus); joining it is asked for with "auto"
        ray.init(address="local", num_cpus=local_cpus or max(LOCAL_MIN_CPUS, os.cpu_count() or 1), namespace=namespace,
                 include_dashboard=False, **ray_init_kwargs(local=True))
        where = "local"
    quiet_ray_libraries()
    return where


@dataclass(frozen=True)
class Demand:
    """``count`` bundles of ``cpus`` CPUs and ``gpus`` GPUs, each on one node (a Ray Train worker, a
    labeling actor); ``what`` names them in messages."""

    what: str
    count: int
    cpus: float
    gpus: float = 0.0

    def describe(self) -> str:
        per = f"{self.cpus:g} CPU" + (f" + {self.gpus:g} GPU" if self.gpus else "")
        return f"{self.count} {self.what} x {per}"


def fits(demands: list[Demand], nodes: list[dict[str, float]]) -> bool:
    """Whether every bundle of ``demands`` can be placed on ``nodes`` (each a ``{"CPU": n, "GPU": m}``
    capacity), first-fit by decreasing size: Ray places each bundle on one node."""
    free = [dict(n) for n in nodes]
    bundles = sorted(((d.gpus, d.cpus) for d in demands for _ in range(d.count)), reverse=True)
    eps = 1e-9
    for gpus, cpus in bundles:
        for node in free:
            if node.get("GPU", 0.0) + eps >= gpus and node.get("CPU", 0.0) + eps >= cpus:
                node["GPU"] = node.get("GPU", 0.0) - gpus
                node["CPU"] = node.get("CPU", 0.0) - cpus
                break
        else:
            return False
    return True


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [{"CPU": float(n["Resources"].get("CPU", 0.0)), "GPU": float(n["Resources"].get("GPU", 0.0))}
            for n in ray.nodes() if n.get("Alive")]


def describe_nodes(nodes: list[dict[str, float]]) -> str:
    cpus, gpus = sum(n["CPU"] for n in nodes), sum(n["GPU"] for n in nodes)
    per = ", ".join(f"{n['CPU']:g} CPU" + (f"/{n['GPU']:g} GPU" if n["GPU"] else "") for n in nodes)
    return f"{len(nodes)} node(s), {cpus:g} CPU and {gpus:g} GPU in all ({per})"


class UnschedulableError(ConfigError):
    """The cluster cannot hold what the job asks for (one line: the ask, what the cluster has, what to
    change); a settings error, so the CLI prints it as one line and exits with status 2."""


def require_resources(demands: list[Demand], *, timeout_s: float, prefix: str = "train",
                      poll_s: float = 5.0, echo=print) -> None:
    """Return once the cluster's nodes can hold ``demands``; otherwise print one line at once (what
    the job asks for, what the cluster has) and wait up to ``timeout_s`` for nodes to join (an
    autoscaler), then raise :class:`UnschedulableError` with the same facts."""
    demands = [d for d in demands if d.count > 0]
    ask = " + ".join(d.describe() for d in demands)
    nodes = _alive_nodes()
    if fits(demands, nodes):
        return
    echo(f"[{prefix}] waiting up to {timeout_s:.0f} s for resources: the job asks for {ask}; the cluster has "
         f"{describe_nodes(nodes)} (scaling.resources_timeout_s sets the wait)", flush=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        nodes = _alive_nodes()
        if fits(demands, nodes):
            echo(f"[{prefix}] resources available: {describe_nodes(nodes)}", flush=True)
            return
    raise UnschedulableError(
        f"the job asks for {ask} but the cluster has {describe_nodes(nodes)} after {timeout_s:.0f} s; lower "
        "scaling.num_workers / scaling.cpus_per_worker / labeling.pool_size or add nodes")


def training_demands(cfg) -> list[Demand]:
    """What a training (or pre-training) run places: its Ray Train workers and, for the recipes with
    a labeling pool, the pool's actors (the label store and the coordinator take no CPU)."""
    s = cfg.scaling
    demands = [Demand("trainers", s.num_workers, s.cpus_per_worker, 1.0 if s.use_gpu else 0.0)]
    if getattr(cfg, "uses_labeling_pool", False):
        lab = cfg.labeling
        demands.append(Demand("labeling actors", lab.pool_size, 0.0 if s.use_gpu else lab.cpus_per_actor,
                              1.0 if s.use_gpu else 0.0))
    return demands
