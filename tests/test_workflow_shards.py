"""Sharded profiling through the snakemake CLI: profile_shard jobs and a merge, byte-identical
to the single profile job."""

import pytest

from workflow_helpers import planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow

NAME = "tiny-shards"
TARGET = f"results/{NAME}/act_scales.json"


def _config(model_dir, corpus, shards, dtype):
    return {
        "model": {"source": str(model_dir), "name": NAME},
        "calibration": {"dataset": str(corpus), "num_samples": 10, "seq_len": 32, "batch_size": 2,
                        "checkpoint_every": 2, "shards": shards},
        "device": "cpu",
        "dtype": dtype,
        "transform": {"variants": ["none"]},
    }


# The rules' wiring does not depend on the dtype; tests/test_shards.py proves the byte-identical merge for
# float32 and bfloat16 in process.
@pytest.mark.parametrize("dtype", ["float32"])
def test_two_shards_merge_to_the_unsharded_act_scales(dtype, tiny_model_dir, tiny_text_corpus, tmp_path):
    runs = {}
    for shards in (1, 2):
        workdir = tmp_path / f"shards-{shards}"
        workdir.mkdir()
        config = write_config(workdir, _config(tiny_model_dir("llama"), tiny_text_corpus, shards, dtype))
        jobs = planned_jobs(snakemake(workdir, config, TARGET, "-n"))
        expected = {"profile": 1} if shards == 1 else {"profile_shard": 2, "merge_profile": 1}
        assert {k: v for k, v in jobs.items() if "profile" in k} == expected
        snakemake(workdir, config, TARGET)
        runs[shards] = workdir / f"results/{NAME}"
    for name in ("act_scales.json", "act_scales.csv"):
        assert (runs[2] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    assert sorted(p.name for p in (runs[2] / "profile-shards").iterdir()) == [
        "shard-0-of-2.safetensors", "shard-1-of-2.safetensors"]
    assert (runs[2].parent.parent / f"logs/{NAME}/profile_shard-1.log").exists()
