"""Run a stage from a Snakemake `script:` with the rule's log, threads and one-line errors."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Callable

from shadowquant.errors import PipelineError


def run_stage(snakemake, stage: Callable, **kwargs) -> None:
    """Call `stage(**kwargs)`; progress and logging go to the rule's log, errors also to the terminal."""
    terminal = sys.stderr
    log_path = snakemake.log[0] if len(snakemake.log) else None
    log_file = open(log_path, "a", buffering=1, encoding="utf-8") if log_path else terminal
    sys.stderr = log_file  # tqdm and warnings land in the rule's log
    logging.basicConfig(level=logging.INFO, stream=log_file, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    threads = int(getattr(snakemake, "threads", 1) or 1)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    try:
        stage(**kwargs)
    except PipelineError as exc:
        for stream in {log_file, terminal}:
            print(f"error: {exc}", file=stream, flush=True)
        sys.exit(1)
    except Exception:
        traceback.print_exc(file=log_file)
        print(f"error: unexpected failure in rule {snakemake.rule}; see {log_path}", file=terminal, flush=True)
        sys.exit(1)
    finally:
        sys.stderr = terminal
