"""Device meshes from flags: ``--mesh data=1,expert=8,tensor=1``.

The mesh always has the three axes of the rules table (``sharding.DEFAULT_RULES``), in the
order ``data, expert, tensor``; an axis left out of the flag has size 1. Sizes must multiply
to the number of devices (all processes' devices together on several hosts), and the model
must split over them: ``validate_for`` checks that before anything is compiled, so a bad
flag fails at start-up with the name of the axis and the number that does not divide.

Several hosts: one process per host calls ``initialize_distributed`` (JAX's own runtime,
``jax.distributed.initialize``) before any other jax call; ``jax.devices()`` then lists every
host's devices and the same ``parse_mesh`` builds the global mesh on each process.
"""

from __future__ import annotations

import argparse
import math

import jax
from jax.sharding import AxisType, Mesh

from dsv4_jax.config import Config

AXES = ("data", "expert", "tensor")


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """``"data=2,expert=4"`` -> ``{"data": 2, "expert": 4, "tensor": 1}`` (every axis, in mesh order)."""
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq:
            raise ValueError(f"--mesh: {part!r} is not of the form axis=size (e.g. data=1,expert=8,tensor=1)")
        if name not in AXES:
            raise ValueError(f"--mesh: unknown axis {name!r}; the axes are {', '.join(AXES)}")
        if name in sizes:
            raise ValueError(f"--mesh: axis {name!r} given twice")
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"--mesh: size of {name!r} must be an integer, got {value.strip()!r}") from None
        if n < 1:
            raise ValueError(f"--mesh: size of {name!r} must be >= 1, got {n}")
        sizes[name] = n
    return {a: sizes.get(a, 1) for a in AXES}


def parse_mesh(spec: str, devices=None) -> Mesh:
    """A mesh ``(data, expert, tensor)`` over ``devices`` (default: every device of every process).
    ``"auto"``: all of them on the expert axis (expert parallelism, V4's serving layout).

    Axis types are ``Auto``: jitted code is partitioned by XLA from the shardings of its
    inputs and ``with_sharding_constraint``; the collectives that matter (expert all-to-all,
    data-parallel attention) are explicit ``shard_map`` regions.
    """
    devices = list(jax.devices() if devices is None else devices)
    if spec.strip() == "auto":  # every device, experts split over all of them (EP), no TP / DP
        spec = f"expert={len(devices)}"
    sizes = parse_mesh_spec(spec)
    total = math.prod(sizes.values())
    if total != len(devices):
        shown = ",".join(f"{a}={n}" for a, n in sizes.items())
        raise ValueError(
            f"--mesh {shown} covers {total} devices but {len(devices)} are available "
            f"({jax.process_count()} process(es)); the sizes must multiply to the device count"
        )
    return jax.make_mesh(
        tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices
    )


def validate_for(mesh: Mesh, cfg: Config) -> None:
    """Fail early when the model cannot split over ``mesh``: routed experts over ``expert``.

    Tensor splits that do not divide (4 heads over 8 devices in a tiny test model) are
    fitted by the placement rules instead: such a weight replicates rather than fails.
    """
    ep = mesh.shape.get("expert", 1)
    if cfg.n_routed_experts % ep:
        raise ValueError(f"--mesh expert={ep} does not divide n_routed_experts={cfg.n_routed_experts}")


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
    """The flags the server and scripts share: the mesh, and the multi-host runtime."""
    parser.add_argument(
        "--mesh",
        default=None,
        help="device mesh, e.g. data=1,expert=8,tensor=1, or 'auto' (every device, expert parallel); "
        "default: one device",
    )
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host only)")
    parser.add_argument("--num-processes", type=int, default=None, help="number of processes (one per host)")
    parser.add_argument("--process-id", type=int, default=None, help="this process's index, 0-based")
    parser.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=HEARTBEAT_TIMEOUT_S,
        help="multi-host: seconds without a heartbeat after which a process counts as dead "
        "(an exited one counts at once); the group then fails",
    )


HEARTBEAT_TIMEOUT_S = 10


def initialize_distributed(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    timeout_s: int = 300,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
) -> bool:
    """Join the multi-host runtime when a coordinator is given (returns whether it did).

    Must run before anything else touches jax. All processes pass the same coordinator
    address (process 0's host and a free port) and process count; each its own id.

    The coordination service runs in its recoverable mode: by default it would terminate every
    process the moment one dies, before process 0 could answer its clients; here process 0 sees
    the loss (``lockstep.Watchdog``), fails the requests in flight and exits on its own terms.
    Followers still end when process 0 does (the service lives in it).
    """
    if coordinator is None:
        return False
    if num_processes is None or process_id is None:
        raise ValueError("--coordinator needs --num-processes and --process-id")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is not in [0, {num_processes})")
    if heartbeat_timeout_s < 1:
        raise ValueError(f"--heartbeat-timeout must be >= 1 second, got {heartbeat_timeout_s}")
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    return True


def mesh_from_args(args: argparse.Namespace, cfg: Config | None = None) -> Mesh | None:
    """Initialise the runtime if asked, then build and validate the mesh (``None``: one device;
    with ``--coordinator`` and no ``--mesh``: ``auto`` over every process's devices)."""
    initialize_distributed(
        args.coordinator,
        args.num_processes,
        args.process_id,
        heartbeat_timeout_s=getattr(args, "heartbeat_timeout", HEARTBEAT_TIMEOUT_S),
    )
    spec = args.mesh
    if spec is None:
        if args.coordinator is None:
            return None
        spec = "auto"  # one model over every process's devices (lockstep serving)
    mesh = parse_mesh(spec)
    if cfg is not None:
        validate_for(mesh, cfg)
    return mesh
