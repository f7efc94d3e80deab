"""TVM's CPU thread pool sized to the cores this process may run on.

Left to itself, TVM's runtime starts half as many workers as there are CPUs on x86 (it
assumes every core has two hyper-threads). On a machine without SMT, like this 2-core one,
every kernel then runs on one core: half the speed, in tuning measurements and in
deployment alike. The pool reads TVM_NUM_THREADS once, when it first starts, and child
processes (MetaSchedule's runners) inherit it, so this runs before any kernel does.
"""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Distinct physical cores among the CPUs this process is allowed to use (affinity,
    cgroup cpusets), counting two hyper-threads of one core once."""
    cpus = sorted(os.sched_getaffinity(0))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:  # no sysfs (containers without it): count logical CPUs
            return len(cpus)
    return max(1, len(cores))


def use_all_cores() -> int:
    """The number of threads TVM will use: TVM_NUM_THREADS (or OMP_NUM_THREADS) when the
    user set one, else all physical cores, which this sets for the pool and child processes."""
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    cores = physical_cores()
    os.environ["TVM_NUM_THREADS"] = str(cores)
    return cores
