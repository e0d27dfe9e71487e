"""Run workflows through a real single-node SLURM cluster with profiles/slurm.

tests/slurm/start.sh brings up a private cluster (munged, slurmctld, slurmd) whose
one node has 2 CPUs, a small cluster node, and the workflows run as users run
them: `--profile profiles/slurm`, no --cores. The run must be proven to have gone
through SLURM: every non-local job has a SLURM job id, a SLURM job whose comment
names its rule, and a kept per-job log under .snakemake/slurm_logs.

Where SLURM cannot run here (start.sh exit 77: not root, not Linux, no apt-get;
or the plugin is missing) the tests skip and say why; under CI (CI=true) they
fail instead, so a CI machine that cannot run them is noticed. Switch them off
explicitly with SHADOWQUANT_SKIP_SLURM=1. Any other start.sh failure (apt-get,
daemons, a node that never goes idle) is a failure everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, NoReturn, Union

import pytest
import yaml

from shadowquant.config import schema

# One private cluster (fixed ports, one state directory): every SLURM test on the same pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("slurm")

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = REPO / "tests" / "slurm"
SLURM_PROFILE = REPO / "profiles" / "slurm"
WORKFLOW_PROFILE = REPO / "profiles" / "default"
VENV_BIN = Path(sys.executable).parent
CANNOT_RUN_SLURM = 77  # start.sh's exit code for "not possible here"; any other non-zero is "broken"
SKIP_SWITCH = "SHADOWQUANT_SKIP_SLURM"  # =1 switches the SLURM tests off, also under CI
NODE_CPUS = 2  # start.sh's default node size
PROFILE_THREADS = schema()["properties"]["threads"]["properties"]["profile"]["default"]

# Only to keep the test short: first status poll after 2 s instead of the
# profile's 20 s (the plugin adds 10 s per poll while no job has finished).
FAST_POLLING = ["--slurm-init-seconds-before-status-checks", "2"]

# Two SLURM jobs in sequence plus a local target rule. Each job writes the
# SLURM_JOB_ID it ran under, so the outputs prove where they were made.
TINY_SNAKEFILE = """\
localrules: all

rule all:
    input: "summed.txt"

rule numbers:
    output: "numbers.txt"
    threads: 2
    resources: mem_mb=300, runtime=5
    shell: "seq 1 10 > {output}; echo slurm_job=$SLURM_JOB_ID >> {output}"

rule summed:
    input: "numbers.txt"
    output: "summed.txt"
    params: label=config["label"]
    shell:
        "awk '!/slurm_job/ {{total += $1}} END {{print total}}' {input} > {output};"
        " grep slurm_job {input} >> {output};"
        " echo {params.label} slurm_job=$SLURM_JOB_ID >> {output}"
"""


ConfigSource = Union[dict, Callable[[pytest.FixtureRequest], dict]]


@dataclass(frozen=True)
class WorkflowCase:
    """One workflow to run under SLURM: its Snakefile, config, extra snakemake arguments.

    config is a dict, or a function of the test's `request` that builds one from
    fixtures (for example conftest's tiny models).
    """

    name: str
    snakefile: Path | None  # None: the tiny workflow above, written into the run dir
    config: ConfigSource = field(default_factory=dict)
    snakemake_args: list[str] = field(default_factory=list)  # targets, --max-threads, ...
    timeout_s: int = 240


def tiny_llama_config(request: pytest.FixtureRequest) -> dict:
    """The real workflow's config for conftest's tiny LLaMA and text corpus."""
    return {
        "model": {"source": str(request.getfixturevalue("tiny_model_dir")("llama")), "name": "tiny-llama"},
        "calibration": {"dataset": str(request.getfixturevalue("tiny_text_corpus")), "num_samples": 6,
                        "seq_len": 32, "batch_size": 3, "checkpoint_every": 0},
        "device": "cpu",
        "transform": {"variants": ["none"]},
    }


TINY_WORKFLOW = WorkflowCase("tiny", snakefile=None, config={"label": "tiny-run"})
# The real workflow up to profiling (fetch_model, select_calibration, profile).
# No --cores: rule profile's threads come from config key threads.profile, whose
# default must fit the 2-CPU node by itself.
REAL_WORKFLOW = WorkflowCase(
    "real", snakefile=REPO / "Snakefile", config=tiny_llama_config,
    snakemake_args=["results/tiny-llama/act_scales.json"],
)
CASES = [TINY_WORKFLOW, REAL_WORKFLOW]


def _free_ports(count: int) -> list[int]:
    """Ports free right now; held open together so they are distinct."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _is_set(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes"}


def skip_if_switched_off(environ: Mapping[str, str] = os.environ) -> None:
    if _is_set(environ.get(SKIP_SWITCH)):
        pytest.skip(f"SLURM tests switched off ({SKIP_SWITCH}=1)")


def cannot_run_here(reason: str, environ: Mapping[str, str] = os.environ) -> NoReturn:
    """SLURM is not possible on this machine: skip visibly, but fail under CI."""
    if _is_set(environ.get("CI")):
        pytest.fail(f"SLURM test cannot run under CI: {reason} (set {SKIP_SWITCH}=1 to switch it off)",
                    pytrace=False)
    # The warning makes the reason show in a default pytest summary.
    warnings.warn(f"SLURM test skipped: {reason}", stacklevel=2)
    pytest.skip(reason)


def start_cluster(env: dict[str, str]) -> dict[str, str]:
    """Run start.sh; its KEY=VALUE lines (SLURM_CONF, SLURM_WRAPPERS), or skip/fail as the policy says."""
    started = subprocess.run(
        ["bash", str(SLURM_SCRIPTS / "start.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    last_line = (started.stderr.strip().splitlines() or ["(no message)"])[-1]
    if started.returncode == CANNOT_RUN_SLURM:
        cannot_run_here(last_line)
    if started.returncode != 0:
        pytest.fail(f"{last_line} (start.sh exit {started.returncode})\n{started.stdout}\n{started.stderr}",
                    pytrace=False)
    return dict(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """A running private SLURM cluster; yields the environment to submit with."""
    skip_if_switched_off()
    if shutil.which("snakemake", path=str(VENV_BIN)) is None:
        cannot_run_here(f"no snakemake in {VENV_BIN}")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        cannot_run_here("snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')")
    # A short private path: the munge socket path must stay under 108 bytes.
    state_dir = tempfile.mkdtemp(prefix="sq-slurm-", dir="/tmp")
    ctld_port, slurmd_port = _free_ports(2)
    env = {
        **os.environ,
        "SQ_SLURM_DIR": state_dir,
        "SQ_SLURM_CTLD_PORT": str(ctld_port),
        "SQ_SLURM_SLURMD_PORT": str(slurmd_port),
    }
    try:
        cluster = start_cluster(env)
        # Jobs inherit the submitting environment: the cluster's srun wrapper, then
        # the venv, first on PATH.
        path = os.pathsep.join([cluster["SLURM_WRAPPERS"], str(VENV_BIN), env["PATH"], "/usr/sbin"])
        yield {**env, "SLURM_CONF": cluster["SLURM_CONF"], "PATH": path}
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop.sh")], env=env, capture_output=True, timeout=60)


def prepare_run_dir(case: WorkflowCase, run_dir: Path, request: pytest.FixtureRequest) -> list[str]:
    """Write the case's config (and the tiny Snakefile) into run_dir; return snakemake's argv."""
    snakefile = case.snakefile
    if snakefile is None:
        snakefile = run_dir / "Snakefile"
        snakefile.write_text(TINY_SNAKEFILE)
        # Snakemake loads profiles/default beside the Snakefile together with
        # --profile; the tiny workflow gets the repo's so the pair is tested.
        shutil.copytree(WORKFLOW_PROFILE, run_dir / "profiles" / "default")
    config_file = run_dir / "test-config.yaml"
    config = case.config(request) if callable(case.config) else case.config
    config_file.write_text(yaml.safe_dump(config))
    return [
        str(VENV_BIN / "snakemake"),
        "--snakefile", str(snakefile),
        "--directory", str(run_dir),
        "--configfile", str(config_file),
        "--profile", str(SLURM_PROFILE),
        *case.snakemake_args,
    ]


def run_snakemake(argv: list[str], env: dict[str, str], cwd: Path, timeout_s: int) -> subprocess.CompletedProcess:
    """Run snakemake; on timeout stop it, cancel its jobs and fail with the queue state."""
    with subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    ) as process:
        try:
            output, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)  # snakemake cancels its SLURM jobs on SIGINT
            output, _ = process.communicate(timeout=60)
            queue = subprocess.run(["squeue", "--states=all", "-o", "%i %j %T %r %k"], env=env,
                                   capture_output=True, text=True).stdout
            pytest.fail(f"snakemake ran past {timeout_s} s; queue:\n{queue}\n{output[-6000:]}")
    return subprocess.CompletedProcess(argv, process.returncode, output, "")


SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.?$", re.MULTILINE)


def slurm_job_record(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge)."""
    shown = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], env=env,
                           capture_output=True, text=True, check=True).stdout
    return dict(item.split("=", 1) for item in shown.split() if "=" in item)


def rule_of_comment(comment: str, rules: set[str]) -> str | None:
    """The rule a job comment names: 'rule_<rule>' or 'rule_<rule>_wildcards_<...>'."""
    for rule in rules:
        if comment == f"rule_{rule}" or comment.startswith(f"rule_{rule}_wildcards_"):
            return rule
    return None


@pytest.mark.slurm
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_workflow_runs_through_slurm(
    case: WorkflowCase, slurm_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    argv = prepare_run_dir(case, tmp_path, request) + FAST_POLLING
    result = run_snakemake(argv, slurm_env, tmp_path, case.timeout_s)
    log = result.stdout
    assert result.returncode == 0, f"snakemake failed:\n{log[-8000:]}"

    # Both profiles in force: profiles/slurm and, found beside the Snakefile, profiles/default.
    assert f"Using profiles {SLURM_PROFILE} and workflow specific profile" in log, log[:2000]
    remote_rules = set(re.findall(r"^(?:rule|checkpoint) (\w+):$", log, re.MULTILINE))
    submissions = SUBMITTED.findall(log)
    assert remote_rules, f"no job ran outside localrules:\n{log[-4000:]}"
    assert len(submissions) >= len(remote_rules), f"not every job was submitted to SLURM:\n{log[-4000:]}"

    rules_seen_by_slurm = set()
    for job_id, slurm_log in submissions:
        record = slurm_job_record(job_id, slurm_env)
        rule = rule_of_comment(record.get("Comment", ""), remote_rules)
        assert rule is not None, f"SLURM job {job_id} comment {record.get('Comment')!r} names no rule"
        assert record["JobState"] == "COMPLETED", f"SLURM job {job_id} ({rule}): {record['JobState']}"
        rules_seen_by_slurm.add(rule)
        # The profile keeps successful jobs' logs, under the plugin's per-rule folder.
        kept_log = Path(slurm_log)
        assert kept_log.is_file(), f"SLURM log of job {job_id} was not kept: {kept_log}"
        assert kept_log.is_relative_to(tmp_path / ".snakemake" / "slurm_logs" / f"rule_{rule}")
    assert rules_seen_by_slurm == remote_rules

    if case is TINY_WORKFLOW:
        check_tiny_workflow(tmp_path, dict(submissions), slurm_env)
    else:  # threads.profile's default became the profile job's CPUs
        profile_job = next(job_id for job_id, log in submissions if "/rule_profile/" in log)
        assert slurm_job_record(profile_job, slurm_env)["NumCPUs"] == str(PROFILE_THREADS)


def check_tiny_workflow(run_dir: Path, submissions: dict[str, str], env: dict[str, str]) -> None:
    """Outputs name the SLURM jobs that made them; resources reached sbatch."""
    summed = (run_dir / "summed.txt").read_text().splitlines()
    assert summed[0] == "55"
    job_ids = sorted(submissions, key=int)
    assert summed[1:] == [f"slurm_job={job_ids[0]}", f"tiny-run slurm_job={job_ids[1]}"]
    numbers_job, summed_job = (slurm_job_record(job_id, env) for job_id in job_ids)
    # threads -> --cpus-per-task (not capped by a `cores` setting); rule
    # resources and the profile's default-resources -> --mem and --time.
    assert numbers_job["NumCPUs"] == "2", f"threads: 2 became {numbers_job['NumCPUs']} CPUs (a `cores` cap?)"
    assert numbers_job["MinMemoryNode"] == "300M"
    assert numbers_job["TimeLimit"] == "00:05:00"
    assert summed_job["MinMemoryNode"] == "4000M"
    assert summed_job["TimeLimit"] == "01:00:00"


@pytest.mark.slurm
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_dry_run_shows_resources_of_every_job(
    case: WorkflowCase, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """`snakemake --profile profiles/slurm -n` prints mem_mb and runtime for each job.

    Resources computed from input files not yet made show as <TBD> in a dry run.
    """
    skip_if_switched_off()
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        cannot_run_here("snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')")
    argv = prepare_run_dir(case, tmp_path, request) + ["--dry-run"]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]

    jobs = re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", log, re.MULTILINE)
    assert jobs, log[-4000:]
    for rule, block in jobs:
        resources = re.search(r"^    resources: (.*)$", block, re.MULTILINE)
        assert resources, f"rule {rule} shows no resources:\n{block}"
        for name in ("mem_mb", "runtime"):
            assert re.search(rf"\b{name}=(\d+|<TBD>)", resources[1]), f"rule {rule} shows no {name}:\n{block}"
    if case is TINY_WORKFLOW:
        by_rule = dict(jobs)
        assert "mem_mb=300," in by_rule["numbers"] and "runtime=5" in by_rule["numbers"]
        assert "mem_mb=4000," in by_rule["summed"] and "runtime=60" in by_rule["summed"]


@pytest.mark.slurm
def test_threads_beyond_the_node_fail_before_anything_is_submitted(
    slurm_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """threads.profile above the node's CPUs: one error line within seconds, not a job pending forever."""
    too_many = NODE_CPUS + 6
    case = WorkflowCase(
        "too-many-threads", snakefile=REPO / "Snakefile",
        config=lambda req: {**tiny_llama_config(req), "threads": {"profile": too_many}},
        snakemake_args=["results/tiny-llama/act_scales.json"], timeout_s=120,
    )
    result = run_snakemake(prepare_run_dir(case, tmp_path, request), slurm_env, tmp_path, case.timeout_s)
    assert result.returncode != 0, result.stdout[-4000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: rule profile asks for {too_many} threads (sbatch --cpus-per-task) but the largest node of "
        f"SLURM partition 'debug' has {NODE_CPUS} CPUs, so it would stay pending forever; "
        f"set config key threads.profile to at most {NODE_CPUS}"
    ], result.stdout[-4000:]
    assert not SUBMITTED.search(result.stdout), f"a job was submitted:\n{result.stdout[-4000:]}"


@pytest.mark.slurm
def test_start_sh_tells_not_possible_from_broken(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """A node larger than the machine is "not possible here" (77); a bad setting is "broken" (1)."""
    def start(**settings: str) -> subprocess.CompletedProcess:
        env = {**slurm_env, "SQ_SLURM_DIR": str(tmp_path / "cluster"), **settings}
        return subprocess.run(["bash", str(SLURM_SCRIPTS / "start.sh")], env=env, capture_output=True,
                              text=True, timeout=60)

    too_big = start(SQ_SLURM_CPUS=str((os.cpu_count() or 1) * 1000))
    assert too_big.returncode == CANNOT_RUN_SLURM, too_big.stderr
    assert too_big.stderr.strip().splitlines()[-1].startswith("start.sh: not possible here: machine has ")
    bad_setting = start(SQ_SLURM_CPUS="two")
    assert bad_setting.returncode == 1, bad_setting.stderr
    assert bad_setting.stderr.strip().splitlines()[-1].startswith("start.sh: broken: SQ_SLURM_CPUS='two'")
    assert not (tmp_path / "cluster").exists()  # nothing was started


@pytest.mark.parametrize("environ, outcome, message", [
    ({}, pytest.skip.Exception, "no root here"),
    ({"CI": "true"}, pytest.fail.Exception, f"cannot run under CI: no root here (set {SKIP_SWITCH}=1"),
    ({"CI": "true", SKIP_SWITCH: "1"}, pytest.skip.Exception, f"switched off ({SKIP_SWITCH}=1)"),
])
def test_a_slurm_test_that_cannot_run_fails_under_ci_unless_switched_off(environ, outcome, message) -> None:
    with pytest.raises(outcome, match=re.escape(message)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skip_if_switched_off(environ)
        cannot_run_here("no root here", environ)
