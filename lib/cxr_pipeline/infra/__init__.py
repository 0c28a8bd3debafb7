"""Infrastructure: storage (local, HDFS), the HDFS loader, run folders, the local stack, YARN, tables."""
