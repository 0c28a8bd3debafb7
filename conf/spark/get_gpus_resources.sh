#!/usr/bin/env bash
# Spark GPU discovery script (spark.{worker,executor}.resource.gpu.discoveryScript), as Spark's own
# examples/src/main/scripts/getGpusResources.sh: prints {"name": "gpu", "addresses": ["0", "1", ...]},
# the nvidia-smi indices of this host's GPUs. Copy it to the same path on every GPU host.
set -euo pipefail
ADDRS=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed -e ':a' -e 'N' -e '$!ba' -e 's/\n/","/g')
echo "{\"name\": \"gpu\", \"addresses\": [\"$ADDRS\"]}"
