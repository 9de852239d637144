"""Several processes as one JAX job (the hosts of a TPU pod, several GPU hosts): `jax.distributed`.

`initialize` must run before anything else touches JAX. It connects the processes when they are
named explicitly (flags or `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`), or
when this is a Cloud TPU VM (JAX finds the pod's hosts itself); otherwise the job is one process
using every local device (a laptop, one GPU box with several GPUs). CPU processes talk over gloo.
"""
from __future__ import annotations

import os
from pathlib import Path

from jaxtune.errors import JaxtuneError

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM exposes its chips as /dev/accel* (v2-v4) or /dev/vfio/* (v5e and later)."""
    return any(Path("/dev").glob("accel*")) or any(Path("/dev/vfio").glob("[0-9]*"))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    import jax

    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for key, env in ENV.items():
        if given[key] is None and os.environ.get(env):
            given[key] = os.environ[env]
    named = [k for k, v in given.items() if v is not None]
    if named and len(named) < len(given):
        missing = [f"--{k.replace('_', '-')} (or {ENV[k]})" for k in given if given[k] is None]
        raise JaxtuneError(f"a multi-process job needs all of coordinator, num-processes and process-id; "
                           f"missing {', '.join(missing)}")
    if named:
        try:
            num, index = int(given["num_processes"]), int(given["process_id"])
        except ValueError:
            raise JaxtuneError(f"--num-processes and --process-id must be integers, got "
                               f"{given['num_processes']!r} and {given['process_id']!r}") from None
        if not 0 <= index < num:
            raise JaxtuneError(f"--process-id {index} is not in 0 .. {num - 1} (--num-processes {num})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(str(given["coordinator"]), num_processes=num, process_id=index)
    elif on_cloud_tpu_vm():
        jax.distributed.initialize()  # one process per host; JAX reads the pod's layout from the VM


def is_main() -> bool:
    """Process 0 writes the run's files and reports; every process computes and checkpoints."""
    import jax

    return jax.process_index() == 0
