"""Arguments the tests give the jobs they run as subprocesses."""

# Jobs whose subject is not MLflow run without it: logging a model (MLflow saves it again, loads it back and
# scores its input example) took about a quarter of a small training job (measured: 149/171 s with tracking,
# 112/125 s without, the sample tree at mixed0, load 12-16). test_tracking and test_phi run jobs with it on.
NO_TRACKING = ("--set", "tracking.enabled=false")
