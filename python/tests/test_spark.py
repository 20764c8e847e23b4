"""The PySpark scenario (python/examples/spark_guarded_job.py) end to end: real Spark (local[2],
Python workers forked by Spark's daemon), a flaky local HTTP API behind one file rate limiter
and one breaker per worker process, the job under run_exclusive, its output published with the
lock's fencing token, and a rerun that publishes 0 bytes.

scripts/setup installs pyspark into .venv and Java 17 when they are missing, so it runs in
scripts/test; run alone, it is skipped when pyspark or Java is missing."""

import importlib.util
import os
import shutil

import pytest

pytest.importorskip("pyspark")
if shutil.which("java") is None:
    pytest.skip("java is not installed", allow_module_level=True)

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "spark_guarded_job.py")


def test_spark_job_under_lock_with_a_shared_limiter_and_breaker(tmp_path):
    spec = importlib.util.spec_from_file_location("spark_guarded_job", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    work, locks = str(tmp_path / "work"), str(tmp_path / "locks")
    first = example.main(work, locks)
    assert first["rows"] == 400
    assert first["failed"] >= 80, "the API fails the first call for 80 ids"
    assert first["rejected"] > 0, "the breaker never opened"
    published = first["published"]
    assert published["written"] == [f"bucket={b}" for b in range(4)]
    assert published["fencing_token"] == first["fencing_token"] >= 1

    again = example.main(work, locks)
    assert again["fencing_token"] > first["fencing_token"]
    assert again["published"]["written"] == [] and again["published"]["bytes_written"] == 0
    # Nothing written; the commit still records the newer fencing token.

    ds = pytest.importorskip("pyarrow.dataset")
    table = ds.dataset(os.path.join(work, "dataset"), format="parquet", partitioning="hive").to_table()
    rows = sorted(zip(table.column("id").to_pylist(), table.column("score").to_pylist()))
    assert rows == [(i, 2 * i) for i in range(400)]
