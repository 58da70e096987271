"""One rank of a real torchrun launch for test_batch_torchrun: run_batch over gloo with a fake runner (no model)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from chunkkv_cli.batch import Rank, Settings, run_batch
from chunkkv_cli.jobs import read_jobs


def runner(job, settings) -> dict:
    if "fail" in job.question:
        raise ValueError("asked to fail")
    return {"answer": f"{job.question.upper()} from rank {os.environ['RANK']}", "new_tokens": 2}


if __name__ == "__main__":
    jobs_file, output = map(Path, sys.argv[1:3])
    summary = run_batch(read_jobs(jobs_file), output, runner, Settings(model="fake"), Rank.from_env())
    if summary is not None:
        print("SUMMARY " + json.dumps(summary))
