"""The scenario palisade for Python exists for: a PySpark job whose executors call a partner API
once per row, through one rate limiter and one circuit breaker, while the driver runs the job
exclusively under a lock and publishes its output fenced by the lock's token.

    python python/examples/spark_guarded_job.py WORK_DIR [LOCK_DIR]

- A small local HTTP API (started here, on a free loopback port) fails the first request for
  every id divisible by 5 with a 503, on purpose.
- Executors call it in `mapPartitions` through one rate limiter shared by every process of the
  host (`RateLimiter.file`, 200 calls/s; `RateLimiter.redis` for a cluster) and
  `palisade.breaker("partner-api", ...)`. Both are captured in the closure and pickled as their
  configuration; the breaker unpickles into the process-wide registry of each Python worker,
  so every task of a worker shares one breaker. A failed or rejected call is retried.
- The driver runs the job under `Coordinator.file(LOCK_DIR).run_exclusive(...)` (a second
  copy started meanwhile is skipped and told who holds the lock), writes Parquet partitioned
  by `bucket` to WORK_DIR/spark, and publishes it to WORK_DIR/dataset with the lock's fencing
  token, comparing rows (`content="rows"`: Spark's Parquet files differ in a few metadata
  bytes from run to run): only partitions whose rows changed are written, so a rerun
  publishes 0 bytes.

Prints one JSON line: rows, failed and rejected calls, Python workers, the fencing token, and
the publish report. Needs pyspark (`pip install pyspark`) and Java 17.
"""

from __future__ import annotations

import http.server
import json
import os
import sys
import tempfile
import threading
from typing import Dict, Iterator, Tuple

import palisade


class FlakyApi(http.server.BaseHTTPRequestHandler):
    """GET /score/<n> answers n*2; the first request for an n divisible by 5 fails with 503."""

    seen: Dict[int, int] = {}
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        n = int(self.path.rsplit("/", 1)[-1])
        with FlakyApi.lock:
            FlakyApi.seen[n] = FlakyApi.seen.get(n, 0) + 1
            fail = n % 5 == 0 and FlakyApi.seen[n] == 1
        body = b"unavailable" if fail else str(n * 2).encode()
        self.send_response(503 if fail else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def start_api() -> Tuple[http.server.ThreadingHTTPServer, str]:
    FlakyApi.seen = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def main(work_dir: str, lock_dir: str) -> dict:
    from pyspark.sql import Row, SparkSession

    api, base_url = start_api()
    # Python workers run the interpreter that has palisade installed (this one).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("palisade-guarded-job")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    failed = spark.sparkContext.accumulator(0)
    rejected = spark.sparkContext.accumulator(0)
    limiter = palisade.RateLimiter.file(os.path.join(lock_dir, "limits"), "200/s")
    # Opens when 2 of the last 10 calls failed; small so that the example shows it opening.
    breaker = palisade.breaker(
        "partner-api", failure_rate_threshold=0.2, sliding_window=10, minimum_calls=10,
        wait_in_open=0.2,
    )

    def score(rows: Iterator[Row]) -> Iterator[Row]:
        # Imported here: the closure is pickled, and a worker imports what the function names.
        import time
        import urllib.error
        import urllib.request

        def fetch(n: int) -> int:
            return int(urllib.request.urlopen(f"{base_url}/score/{n}", timeout=10).read())

        for row in rows:
            while True:
                limiter.acquire("partner-api", timeout=60)  # waits with the GIL released
                try:
                    value = breaker.call(fetch, row.id)
                    break
                except palisade.BreakerOpen as e:
                    rejected.add(1)
                    time.sleep(e.retry_after or 0.05)
                except urllib.error.HTTPError:
                    failed.add(1)
            yield Row(id=row.id, bucket=row.id % 4, score=value, pid=os.getpid())

    def job() -> dict:
        token = palisade.current_job().fencing_token
        ids = spark.createDataFrame([Row(id=i) for i in range(400)]).repartition(4)
        scored = spark.createDataFrame(ids.rdd.mapPartitions(score)).cache()
        workers = scored.select("pid").distinct().count()
        staging = os.path.join(work_dir, "spark")
        # Parquet partitioned by bucket, in whatever order and file split Spark chooses.
        scored.drop("pid").write.mode("overwrite").partitionBy("bucket").parquet(staging)
        palisade.current_job().check()  # still the lock holder: publish under its token
        # content="rows": a partition is unchanged when its rows are, whatever the files'
        # bytes (Spark's Parquet metadata differs from run to run), so a rerun publishes nothing.
        report = palisade.publish(staging, "file://" + os.path.join(work_dir, "dataset"),
                                  content="rows", fencing_token=token, remove_missing=True)
        return {
            "rows": scored.count(),
            "failed": failed.value,
            "rejected": rejected.value,
            "python_workers": workers,
            "fencing_token": token,
            "published": report,
        }

    try:
        result = palisade.Coordinator.file(lock_dir).run_exclusive("spark-daily", job)
        if isinstance(result, palisade.Skipped):
            return {"skipped": True, "holder": result.holder}
        return result.value
    finally:
        spark.stop()
        api.shutdown()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    lock_dir = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="palisade-locks-")
    print(json.dumps(main(sys.argv[1], lock_dir)))
