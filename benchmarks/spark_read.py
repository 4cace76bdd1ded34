"""The `spark` candidate of run_benchmark.py: the Spark data source reads the day in `local[2]` into Parquet.

    python benchmarks/spark_read.py URL API_KEY SECRET_KEY DAY OUT_DIR

Prints where its time went (the JVM and session start, then the one job: planning, download, parse, Arrow
batches into the JVM and Spark's Parquet writer), then the number of rows written as its last line.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    url, api_key, secret_key, day, out = sys.argv[1:6]
    started = time.perf_counter()
    from pyspark.sql import SparkSession

    from amplitude_export.spark import register

    os.environ["PYSPARK_PYTHON"] = sys.executable
    spark = (SparkSession.builder.master("local[2]").appName("amplitude-export-benchmark")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    register(spark)
    session = time.perf_counter()
    events = (spark.read.format("amplitude").option("api_key", api_key).option("secret_key", secret_key)
              .option("base_url", url).option("start", day).option("end", day).option("lag_hours", 0).load())
    events.write.mode("overwrite").parquet(out)
    job = time.perf_counter()
    rows = spark.read.parquet(out).count()
    spark.stop()
    print(f"spark phases: session {session - started:.2f} s, job {job - session:.2f} s", flush=True)
    print(rows)


if __name__ == "__main__":
    main()
