"""Refuse SLURM jobs that ask for more CPUs than any node of their partition has.

SLURM accepts such a job and leaves it pending forever (squeue reason
PartitionConfig) while the executor plugin waits in silence. The workflow runs
this check before it submits anything (onstart in workflow/rules/common.smk),
so the user gets one line naming the rule and the config key to change instead.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Iterable, Mapping

from shadowquant.errors import PipelineError

# One line per node and partition: "<partition>[*] <cpus>"; '*' marks the default partition.
SINFO_COMMAND = ("sinfo", "--noheader", "--Node", "--format=%P %c")


@dataclass(frozen=True)
class Partitions:
    """The largest node of each SLURM partition, in CPUs, and the default partition."""

    largest_node_cpus: dict[str, int]
    default: str | None


@dataclass(frozen=True)
class ThreadRequest:
    """What one job asks of SLURM: its rule, threads (--cpus-per-task) and partition."""

    rule: str
    threads: int
    partition: str | None = None  # the slurm_partition resource; None: the cluster's default


def parse_sinfo(text: str) -> Partitions:
    """Partitions from the output of SINFO_COMMAND."""
    largest: dict[str, int] = {}
    default = None
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].isdigit():
            raise PipelineError(f"sinfo: cannot read line {line.strip()!r}; expected '<partition> <cpus>'")
        name, cpus = fields[0], int(fields[1])
        if name.endswith("*"):
            name = default = name[:-1]
        largest[name] = max(largest.get(name, 0), cpus)
    if not largest:
        raise PipelineError("sinfo lists no nodes: this SLURM cluster has no node to run jobs on")
    return Partitions(largest, default)


def query_sinfo(timeout_s: float = 30) -> str:
    """The output of SINFO_COMMAND; PipelineError when sinfo is missing or fails."""
    try:
        done = subprocess.run(SINFO_COMMAND, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PipelineError(f"cannot run {' '.join(SINFO_COMMAND)}: {exc}") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise PipelineError(f"{' '.join(SINFO_COMMAND)} failed (exit {done.returncode}): {reason}")
    return done.stdout


def check_threads_fit(
    requests: Iterable[ThreadRequest], partitions: Partitions, config_keys: Mapping[str, str]
) -> None:
    """Raise PipelineError (one line) naming every rule whose threads exceed its partition's largest node.

    config_keys maps a rule to the config key that sets its threads; a rule without
    one is pointed at --set-threads. A partition sinfo does not list is left to
    sbatch, which rejects it at once with its own message.
    """
    problems = {}
    for request in sorted(requests, key=lambda r: (-r.threads, r.rule)):
        partition = request.partition or partitions.default
        if partition is None:  # no default partition: the job may land anywhere
            capacity = max(partitions.largest_node_cpus.values())
            where = "the largest SLURM node"
        elif partition in partitions.largest_node_cpus:
            capacity = partitions.largest_node_cpus[partition]
            where = f"the largest node of SLURM partition '{partition}'"
        else:
            continue
        if request.threads <= capacity or request.rule in problems:
            continue
        key = config_keys.get(request.rule)
        remedy = f"set config key {key} to at most {capacity}" if key else f"pass --set-threads {request.rule}={capacity}"
        problems[request.rule] = (
            f"rule {request.rule} asks for {request.threads} threads (sbatch --cpus-per-task) but {where} "
            f"has {capacity} CPUs, so it would stay pending forever; {remedy}"
        )
    if problems:
        raise PipelineError("; ".join(problems.values()))
