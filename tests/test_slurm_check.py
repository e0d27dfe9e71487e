"""The pre-submission check that every SLURM job's threads fit a node, on canned sinfo output."""

import re
from pathlib import Path

import pytest

from shadowquant.errors import PipelineError
from shadowquant.slurm_check import Partitions, ThreadRequest, check_threads_fit, parse_sinfo, query_sinfo

REPO = Path(__file__).resolve().parents[1]
KEYS = {"profile": "threads.profile", "evaluate_threshold": "threads.evaluate"}

# `sinfo --noheader --Node --format="%P %c"`: a node in two partitions, nodes of different sizes.
TWO_PARTITIONS = """\
debug* 2
debug* 2
big 2
big 16
big 8
"""


def test_parse_sinfo_keeps_the_largest_node_per_partition_and_the_default():
    assert parse_sinfo(TWO_PARTITIONS) == Partitions({"debug": 2, "big": 16}, default="debug")
    assert parse_sinfo("gpu 64\n\ncpu 32\n") == Partitions({"gpu": 64, "cpu": 32}, default=None)


@pytest.mark.parametrize("text, message", [
    ("debug* 2+\n", "cannot read line 'debug* 2+'"),
    ("debug*\n", "cannot read line 'debug*'"),
    ("", "sinfo lists no nodes"),
])
def test_parse_sinfo_rejects_what_it_cannot_read(text, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        parse_sinfo(text)


def test_threads_that_fit_pass():
    partitions = parse_sinfo(TWO_PARTITIONS)
    check_threads_fit([ThreadRequest("profile", 2), ThreadRequest("evaluate_threshold", 1)], partitions, KEYS)
    check_threads_fit([ThreadRequest("profile", 16, partition="big")], partitions, KEYS)
    check_threads_fit([], partitions, KEYS)


def test_too_many_threads_name_the_rule_the_node_and_the_config_key():
    with pytest.raises(PipelineError) as raised:
        check_threads_fit([ThreadRequest("evaluate_threshold", 1), ThreadRequest("profile", 8)],
                          parse_sinfo(TWO_PARTITIONS), KEYS)
    assert str(raised.value) == (
        "rule profile asks for 8 threads (sbatch --cpus-per-task) but the largest node of SLURM partition "
        "'debug' has 2 CPUs, so it would stay pending forever; set config key threads.profile to at most 2"
    )


def test_every_rule_that_does_not_fit_is_named_once_on_one_line():
    requests = [ThreadRequest("evaluate_threshold", 4)] * 3 + [ThreadRequest("profile", 32, partition="big"),
                                                               ThreadRequest("plot", 3)]
    with pytest.raises(PipelineError) as raised:
        check_threads_fit(requests, parse_sinfo(TWO_PARTITIONS), KEYS)
    message = str(raised.value)
    assert "\n" not in message
    # Largest request first; a rule with no config key is pointed at --set-threads.
    assert re.findall(r"rule (\w+) asks for (\d+)", message) == [
        ("profile", "32"), ("evaluate_threshold", "4"), ("plot", "3")]
    assert "partition 'big' has 16 CPUs" in message
    assert "set config key threads.evaluate to at most 2" in message
    assert message.endswith("pass --set-threads plot=2")


def test_without_a_default_partition_the_largest_node_of_the_cluster_counts():
    partitions = parse_sinfo("small 2\nlarge 8\n")
    check_threads_fit([ThreadRequest("profile", 8)], partitions, KEYS)
    with pytest.raises(PipelineError, match="but the largest SLURM node has 8 CPUs"):
        check_threads_fit([ThreadRequest("profile", 9)], partitions, KEYS)


def test_a_partition_sinfo_does_not_list_is_left_to_sbatch():
    check_threads_fit([ThreadRequest("profile", 64, partition="elsewhere")], parse_sinfo(TWO_PARTITIONS), KEYS)


def test_query_sinfo_failing_is_a_one_line_error(tmp_path, monkeypatch):
    fake = tmp_path / "sinfo"
    fake.write_text("#!/bin/sh\necho 'sinfo: error: Unable to contact slurm controller' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PipelineError, match=r"failed \(exit 1\): sinfo: error: Unable to contact slurm controller$"):
        query_sinfo()
    fake.unlink()
    with pytest.raises(PipelineError, match="cannot run sinfo"):
        query_sinfo()


def test_every_configurable_threads_line_sits_in_the_rule_it_names():
    """rule_threads("<rule>") in a rule's block names that rule, so the check's message names the right key.

    Rules may sit inside an if/else block (the profile rules do), so they may be indented."""
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    mapped = dict(re.findall(r'^\s+"(\w+)": "(threads\.\w+)",$', common, re.MULTILINE))
    seen = {}
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for rule, body in re.findall(r"^[ \t]*rule (\w+):\n((?:(?![ \t]*rule \w+:)[ \t]+.*\n|\n)*)",
                                     smk.read_text(), re.MULTILINE):
            for named in re.findall(r'threads: rule_threads\("(\w+)"\)', body):
                assert named == rule, f"{smk.name}: rule {rule} takes the threads of rule {named}"
                seen[rule] = mapped.get(rule)
    assert seen == mapped  # every mapped rule exists and uses its key
