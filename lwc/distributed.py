"""Multi-process (multi-host) start-up: `initialize()` before anything touches a JAX backend.

Where the settings come from, first match wins:
  1. the arguments (from flags): coordinator_address, num_processes and process_id, all three;
  2. the environment: LWC_COORDINATOR (host:port), LWC_NUM_PROCESSES, LWC_PROCESS_ID, all three
     (`launch/local.py` sets them), plus LWC_LOCAL_DEVICE_IDS (comma-separated) optionally;
  3. a cluster JAX detects itself: a SLURM step or Open MPI / MPICH job of more than one task,
     or a Cloud TPU VM (/dev/accel*, /dev/vfio/<n>): `jax.distributed.initialize()` without
     arguments;
  4. otherwise a single process: nothing to do.
Some but not all of the three settings, or a bad value, is a UserError. num_processes=1 needs no
coordinator and initialises nothing.

On CPU, processes exchange data through JAX's CPU collectives, which must be chosen before the
backend starts: `initialize` sets `jax_cpu_collectives_implementation` to "gloo" unless set
(JAX 0.10 defaults to gloo already). The number of CPU devices per process is `jax_num_cpu_devices`
(environment: JAX_NUM_CPU_DEVICES), or `num_cpu_devices` here.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from collections.abc import Mapping, Sequence

import jax

from lwc.errors import UserError

log = logging.getLogger("lwc")

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "LWC_COORDINATOR", "LWC_NUM_PROCESSES", "LWC_PROCESS_ID")
ENV_LOCAL_DEVICE_IDS = "LWC_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `jax.distributed.initialize` is called with; None fields are left to JAX's detection."""

  source: str  # "flags", "environment" or the detected cluster
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


def _int(value, name: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise UserError(f"{name}={value!r} is not an integer") from None


def _device_ids(value, name: str) -> tuple[int, ...] | None:
  if value is None or value == "":
    return None
  if isinstance(value, str):
    value = [v for v in value.split(",") if v.strip()]
  elif isinstance(value, int):
    value = [value]
  return tuple(_int(v, name) for v in value)


def _explicit(source: str, names: tuple[str, str, str], coordinator, num_processes, process_id,
              local_device_ids) -> Settings | None:
  """Settings from three values that must be given together; None when all three are absent."""
  values = (coordinator, num_processes, process_id)
  given = [v is not None and v != "" for v in values]
  if not any(given):
    return None
  if not all(given):
    missing = ", ".join(n for n, g in zip(names, given) if not g)
    present = ", ".join(n for n, g in zip(names, given) if g)
    raise UserError(f"multi-process settings from the {source} are incomplete: {present} given "
                    f"but not {missing}")
  n = _int(num_processes, names[1])
  pid = _int(process_id, names[2])
  if n < 1 or not 0 <= pid < n:
    raise UserError(f"{names[2]}={pid} is not in [0, {names[1]}={n})")
  coordinator = str(coordinator)
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"{names[0]}={coordinator!r} is not host:port")
  return Settings(source, coordinator, n, pid, local_device_ids)


def _detected_cluster(env: Mapping[str, str]) -> str | None:
  """The name of a multi-process environment JAX can configure itself from, if any."""
  def more_than_one(var):
    return var in env and env[var].strip().isdigit() and int(env[var]) > 1

  if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and more_than_one("SLURM_NTASKS"):
    return "slurm"
  if more_than_one("OMPI_COMM_WORLD_SIZE"):
    return "openmpi"
  if more_than_one("PMI_SIZE"):
    return "mpich"
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return "cloud-tpu"
  return None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids: Sequence[int] | str | None = None,
            env: Mapping[str, str] | None = None) -> Settings | None:
  """The multi-process settings (see the module docstring), or None for a single process."""
  env = os.environ if env is None else env
  settings = _explicit("flags", ("coordinator_address", "num_processes", "process_id"),
                       coordinator_address, num_processes, process_id,
                       _device_ids(local_device_ids, "local_device_ids"))
  if settings is None:
    settings = _explicit("environment", (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID),
                         env.get(ENV_COORDINATOR), env.get(ENV_NUM_PROCESSES),
                         env.get(ENV_PROCESS_ID),
                         _device_ids(local_device_ids, "local_device_ids")
                         or _device_ids(env.get(ENV_LOCAL_DEVICE_IDS), ENV_LOCAL_DEVICE_IDS))
  if settings is None:
    cluster = _detected_cluster(env)
    if cluster is None:
      return None
    return Settings(cluster, local_device_ids=_device_ids(local_device_ids, "local_device_ids"))
  if settings.num_processes == 1:
    return None
  return settings


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | str | None = None,
               num_cpu_devices: int | None = None) -> Settings | None:
  """Joins the multi-process job described by the arguments or the environment, if any.

  Must run before the first JAX computation. Logs the process index and count and the global and
  local device counts either way. Returns the settings used, None for a single process.
  """
  settings = resolve(coordinator_address, num_processes, process_id, local_device_ids)
  if num_cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", _int(num_cpu_devices, "num_cpu_devices"))
  if settings is not None and not jax.distributed.is_initialized():
    if jax.config.jax_cpu_collectives_implementation is None:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"coordinator_address": settings.coordinator_address,
              "num_processes": settings.num_processes, "process_id": settings.process_id}
    if settings.local_device_ids is not None:
      kwargs["local_device_ids"] = list(settings.local_device_ids)
    try:
      jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
      raise UserError(f"jax.distributed.initialize ({settings.source}: {kwargs}) failed: "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
  log.info("process %d of %d (%s); devices: %d global, %d local (%s)", jax.process_index(),
           jax.process_count(), settings.source if settings else "single process",
           jax.device_count(), jax.local_device_count(), jax.default_backend())
  return settings
