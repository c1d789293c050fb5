"""Ray at the edge: the driver starts (or joins) a Ray cluster and runs the recipe in an actor.

The actor owns the model while it is pruned; the driver holds only the config and the result.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading

import ray

from asft_ray.config import PruneConfig
from asft_ray.distributed.placement import alive_nodes, require_placeable, resource_ask
from asft_ray.errors import AsftError


CONNECT_TIMEOUT_ENV = "ASFT_CONNECT_TIMEOUT_S"
DEFAULT_CONNECT_TIMEOUT_S = 30.0


# glibc serves allocations below its mmap threshold from the heap, and raises that threshold (up
# to 32 MiB) each time a mapped block is freed; the layers, Hessian blocks, activations and
# gathered ZeRO-3 weights a worker allocates and frees at every step then stay in its RSS,
# fragmented. Fixed at 1 MiB, every block that big is its own mapping, handed back to the OS when
# freed. Measured (BENCHMARKS.md): a SparseGPT scoring actor on 1.57 B-model layers peaked 161 MiB
# lower (8 layers, 20 % longer run; 4 MiB: 80 MiB lower, 8 % longer); a ZeRO-3 worker of a small
# Llama 1073 -> 860 MiB. Set for the embedded cluster's workers and the Ray Train workers (a value
# in the driver's environment is kept); on a cluster of your own, set it in the nodes' environment.
WORKER_MMAP_THRESHOLD = str(2**20)


def worker_malloc_env() -> dict[str, str]:
    return {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", WORKER_MMAP_THRESHOLD)}


def init_ray(address: str | None = None, object_store_bytes: int | None = None) -> bool:
    """The one place asft-ray starts or joins Ray.

    With `address` (or $RAY_ADDRESS): join that cluster, after checking within
    $ASFT_CONNECT_TIMEOUT_S (default 30 s) that its GCS port answers. Without: start a private
    embedded cluster (`address="local"`), never one that `ray start` left recorded in Ray's temp
    dir (on a shared host anyone could have put it there). Dashboard off. Its processes end with
    this driver, also after a kill -9 (distributed/reaper.py).

    An embedded cluster's shared-memory object store (Ray spills beyond it) is $ASFT_OBJECT_STORE_GB,
    else `object_store_bytes` (see `streaming_object_store_bytes`), else Ray's default.
    Returns True when this call connected (so the caller should shut it down again)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = check_ray_settings(address)
    options = {}
    if address is None:
        address = "local"
        store_gb = os.environ.get("ASFT_OBJECT_STORE_GB")
        if store_gb:
            object_store_bytes = _object_store_bytes(store_gb)
        if object_store_bytes:
            options["object_store_memory"] = object_store_bytes
        options["runtime_env"] = {"env_vars": worker_malloc_env()}
    else:
        check_cluster_reachable(address)
    in_main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    try:
        context = ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level="ERROR", **options)
    except ConnectionError as err:
        raise AsftError(f"could not reach the Ray cluster at {address}: {err}") from err
    finally:
        if in_main_thread and sigterm is not None:  # ray.init installs sys.exit(15); keep the CLI's own handling
            signal.signal(signal.SIGTERM, sigterm)
    if address == "local":  # the embedded cluster's processes end with this driver, also after a kill -9
        from asft_ray.distributed.reaper import start_reaper

        start_reaper()
        global _embedded_gcs
        _embedded_gcs = getattr(context, "address_info", {}).get("gcs_address")
    return True


_embedded_gcs: str | None = None  # the GCS of the cluster init_ray last started here


def on_embedded_cluster() -> bool:
    """Whether this process is connected to the embedded cluster init_ray started (one local node
    that is all ours), whichever caller started it: `asft run` starts it before its stages."""
    return ray.is_initialized() and ray.get_runtime_context().gcs_address == _embedded_gcs


def check_ray_settings(address: str | None) -> str | None:
    """The cluster address to join (`address`, else $RAY_ADDRESS; None: an embedded cluster), after
    every check of the Ray settings that needs neither Ray nor the network: the address's form,
    $ASFT_OBJECT_STORE_GB (only for an embedded cluster) and $ASFT_CONNECT_TIMEOUT_S. The CLI calls
    it before any other work, so that a bad setting is one line at once."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    store_gb = os.environ.get("ASFT_OBJECT_STORE_GB")  # an embedded cluster's shared-memory object store (Ray spills beyond it)
    if address is None:
        if store_gb:
            _object_store_bytes(store_gb)
        return None
    if store_gb:
        raise AsftError(f"ASFT_OBJECT_STORE_GB sizes the embedded cluster's object store, but --address/RAY_ADDRESS "
                        f"{address} names an existing cluster (its store was sized when it started): unset one of them")
    if address != "auto":  # Ray's own lookup of the cluster recorded on this host: asked for by name
        gcs_host_port(address)
        connect_timeout_s()
    return address


def streaming_object_store_bytes(model_spec: str) -> int | None:
    """An embedded object store sized for streaming a model directory: 10 % of its weight bytes
    (at least 0.3 GiB). Its pages count in the resident memory of every process that touches
    them, so Ray's default (30 % of the machine's memory) would let them grow past one layer's
    worth; what does not fit is spilled to disk. None for models that are not streamed."""
    from asft_ray.models import is_safetensors_dir, resolve_model

    source = resolve_model(model_spec)
    if not is_safetensors_dir(source):
        return None
    from asft_ray.pruning.streaming import SafetensorsReader

    return max(int(0.3 * 2**30), SafetensorsReader(source.location).weight_bytes() // 10)


def prune_object_store_bytes(cfg: PruneConfig) -> int | None:
    """The embedded store a prune of `cfg` starts with (asft prune, asft staged, asft run)."""
    return streaming_object_store_bytes(cfg.model) if cfg.streams() else None


def positive_env_number(name: str, text: str, unit: str) -> float:
    """The value of environment variable `name`, which must be a positive number (of `unit`)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise AsftError(f"{name} must be a positive number of {unit}, got {text!r}")
    return value


def _object_store_bytes(text: str) -> int:
    return int(positive_env_number("ASFT_OBJECT_STORE_GB", text, "GiB") * 2**30)


def connect_timeout_s() -> float:
    text = os.environ.get(CONNECT_TIMEOUT_ENV)
    return DEFAULT_CONNECT_TIMEOUT_S if text is None else positive_env_number(CONNECT_TIMEOUT_ENV, text, "seconds")


def gcs_host_port(address: str) -> tuple[str, int]:
    """`host:port` or `ray://host:port` (Ray Client) -> (host, port); anything else is one clear line."""
    text = address.strip()
    if text.startswith("ray://"):
        text = text[len("ray://"):]
    elif "://" in text:
        raise AsftError(f"--address {address!r} is a URL; a Ray cluster address is the GCS host:port (e.g. "
                        "127.0.0.1:6379) or ray://host:10001 for Ray Client (http:// job-server addresses are for `asft submit`)")
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if not host or any(c.isspace() or c in "/[]" for c in host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise AsftError(f"--address {address!r} is not host:port (e.g. 127.0.0.1:6379)")
    return host, int(port)


def check_cluster_reachable(address: str) -> None:
    """Ray retries an unreachable GCS for many minutes without a word: try its port first, with a timeout."""
    import socket

    if address == "auto":  # Ray's own lookup of the cluster recorded on this host: asked for by name
        return
    host, port = gcs_host_port(address)
    timeout = connect_timeout_s()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except TimeoutError:
        raise AsftError(f"could not reach the Ray cluster at {address}: no answer within {timeout:g} s "
                        f"(${CONNECT_TIMEOUT_ENV} sets the limit)") from None
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise AsftError(f"could not reach the Ray cluster at {address}: {reason}") from None


@ray.remote
class PruneWorker:
    """Runs one pruning recipe with `threads` torch threads; with cfg.workers > 0 it starts
    that many scoring actors and only orchestrates them (and applies the masks)."""

    def __init__(self, threads: int):
        import sys

        import torch

        torch.set_num_threads(threads)
        # Ray forwards an actor's stdout to the driver's stdout; libraries that log to stdout
        # (DeepSpeed's accelerator notice) would mix into `asft ... --json`. Keep stdout for the CLI.
        sys.stdout = sys.stderr

    def ready(self) -> bool:
        return True

    def run(self, cfg: dict, show_progress: bool) -> dict:
        from asft_ray.prune import run_prune

        cfg = _device_reserved(PruneConfig(**cfg))
        return _with_scoring_workers(cfg, lambda *where: run_prune(cfg, show_progress, *where))

    def staged(self, values: dict, show_progress: bool) -> dict:
        from asft_ray.staged import StagedConfig, run_staged

        cfg = StagedConfig.from_dict(values)
        cfg = dataclasses.replace(cfg, prune=_device_reserved(cfg.prune))
        return _with_scoring_workers(cfg.prune, lambda *where: run_staged(cfg, show_progress, *where))


def _device_reserved(cfg: PruneConfig) -> PruneConfig:
    """`device: auto` means a GPU only if this actor reserved one (Ray 2.60 shows every GPU to every actor)."""
    if cfg.device != "auto":
        return cfg
    return dataclasses.replace(cfg, device="cuda" if ray.get_gpu_ids() else "cpu")


def coordinator_options(cfg: PruneConfig, nodes: list[dict], embedded: bool = False) -> dict:
    """What the pruning coordinator reserves on one node: explicit CPUs (never 0, so never a CPU-less
    head), a GPU when it computes on one, memory when asked; never more than one node has.

    The one exception is asft's own embedded cluster (one local node, which has the CPUs): there a
    coordinator that only orchestrates scoring actors reserves no CPU, so that `--workers` can use
    every core of the machine."""
    largest = max((n.get("CPU", 0) for n in nodes), default=1)
    cluster_gpus = sum(n.get("GPU", 0) for n in nodes)
    cpus = cfg.coordinator_cpus or (1 if cfg.uses_scoring_workers else max(1, largest))
    if embedded and cfg.uses_scoring_workers and cfg.coordinator_cpus is None:
        cpus = 0
    gpus = cfg.coordinator_gpus
    if gpus is None:
        on_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and cluster_gpus and not cfg.uses_scoring_workers)
        gpus = 1 if on_gpu else 0
    options = {"num_cpus": cpus, "num_gpus": gpus}
    if cfg.coordinator_memory_gb:
        options["memory"] = int(cfg.coordinator_memory_gb * 2**30)
    return options


def place_coordinator(cfg: PruneConfig, timeout_s: float | None = None, embedded: bool = False):
    """Start the pruning coordinator and wait until it is placed. A request no node can ever hold
    (the coordinator's, or its scoring workers') fails at once, naming the resource; one the cluster
    has but not free fails after the timeout ($ASFT_PLACEMENT_TIMEOUT_S, else 60 s)."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("ASFT_PLACEMENT_TIMEOUT_S", 60))
    nodes = alive_nodes()
    options = coordinator_options(cfg, nodes, embedded)
    require_placeable("the pruning coordinator",
                      resource_ask(options["num_cpus"], options["num_gpus"], options.get("memory")), nodes=nodes)
    if cfg.uses_scoring_workers:
        require_placeable(f"{cfg.workers} scoring workers", worker_resources(cfg).ask(), cfg.workers, nodes)
    worker = PruneWorker.options(**options).remote(max(1, int(options["num_cpus"])))
    ready, _ = ray.wait([worker.ready.remote()], timeout=timeout_s)
    if not ready:
        ray.kill(worker)
        raise AsftError(f"the pruning coordinator could not be placed within {timeout_s:g}s: "
                        "the cluster has the resources, but not free now")
    return worker


def worker_resources(cfg: PruneConfig):
    """What each of the config's scoring actors asks Ray for."""
    from asft_ray.distributed.sharded import WorkerResources

    memory = int(cfg.worker_memory_gb * 2**30) if cfg.worker_memory_gb else None
    return WorkerResources(cfg.worker_cpus, cfg.worker_gpus, memory)


def _with_scoring_workers(cfg: PruneConfig, recipe):
    """recipe() in this process, or recipe(make_runner, sum_gradients) on cfg.workers scoring actors."""
    from asft_ray.distributed.sharded import sharded_gradient_sums, sharded_runner_factory, start_workers

    if not cfg.uses_scoring_workers:
        return recipe()
    workers = start_workers(cfg.workers, worker_resources(cfg))
    try:
        return recipe(sharded_runner_factory(workers), sharded_gradient_sums(workers))
    finally:
        for worker in workers:
            ray.kill(worker)


def asft_cause(err: Exception) -> Exception:
    """The AsftError a Ray task or actor raised (one line for the CLI), else the Ray error as it is."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, AsftError) else err


def prune_on_ray(
    cfg: PruneConfig, address: str | None = None, num_cpus: int | None = None, show_progress: bool = True
) -> dict:
    return _on_ray(cfg, "run", cfg.to_dict(), address, num_cpus, show_progress)


def staged_on_ray(values: dict, address: str | None = None, show_progress: bool = True) -> dict:
    """A staged run (asft_ray.staged) inside the pruning actor; `values` as in the YAML config."""
    from asft_ray.staged import StagedConfig, finished_result

    cfg = StagedConfig.from_dict(values)
    done = finished_result(cfg)  # no coordinator to start (a fresh process: seconds) for a finished run
    return done if done is not None else _on_ray(cfg.prune, "staged", values, address, None, show_progress)


def _on_ray(cfg: PruneConfig, method: str, payload: dict, address, num_cpus, show_progress: bool) -> dict:
    owned = init_ray(address, prune_object_store_bytes(cfg))
    if num_cpus:
        cfg = dataclasses.replace(cfg, coordinator_cpus=cfg.coordinator_cpus or num_cpus)
    try:
        worker = place_coordinator(cfg, embedded=on_embedded_cluster())
    except AsftError:
        if owned:
            ray.shutdown()
        raise
    try:
        return ray.get(getattr(worker, method).remote(payload, show_progress))
    except ray.exceptions.RayTaskError as err:
        raise asft_cause(err) from None
    except ray.exceptions.ActorDiedError as err:
        hint = "; the node ran low on memory" if "memory" in str(err).lower() else ""
        raise AsftError(f"the pruning worker died ({str(err).strip().splitlines()[0]}{hint})") from None
    finally:
        ray.kill(worker)  # on an interrupt too: it cannot clean up after itself then
        if owned:  # also flushes the worker's last log lines before our caller prints anything
            ray.shutdown()
        from asft_ray.artifacts import remove_stale_temp_dirs

        remove_stale_temp_dirs(cfg.out)  # the killed worker's unfinished output folder
