"""What every stage runs: params, errors, atomic I/O, provenance, CPU/GPU set-up, progress, the local store and
the stage runner. One folder, so that dvc.yaml depends on it once per stage."""
