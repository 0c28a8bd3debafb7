"""The embedded infrastructure the README's two commands start: real daemons on 127.0.0.1, no mocks.

``provision`` fetches the Apache Hadoop jars from the registries; ``hdfs_cluster`` runs a NameNode and one or more
DataNodes (``make hdfs-up``); ``spark_cluster`` runs a Spark standalone master and workers from the pip pyspark
(``make spark-up``); ``processes`` tracks their pid files and ports; ``faults`` starts a private stack on free
ports and kills its processes mid-job (tests/test_faults.py, bench/bench_faults.py).
"""
