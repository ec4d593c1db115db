"""joblib's Parallel with shoal's backend, on functions and globals of the script."""

# Runs: shoal only (joblib's backend), not on Dask.

import joblib

import shoal.joblib  # noqa: F401 - registers backend="shoal"

POWER = 3


def cube(x):
    return x**POWER


def setup(power):
    global POWER
    POWER = power


if __name__ == "__main__":
    print(joblib.Parallel(n_jobs=2, backend="shoal")(joblib.delayed(cube)(i) for i in range(5)))
    with joblib.parallel_config(backend="shoal", n_jobs=2, initializer=setup, initargs=(2,)):
        print(joblib.Parallel()(joblib.delayed(cube)(i) for i in range(5)))

# Output:
# [0, 1, 8, 27, 64]
# [0, 1, 4, 9, 16]
