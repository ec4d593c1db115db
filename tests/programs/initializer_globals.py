"""The classic way to share an object with pool workers: an initializer
sets a module global, and the tasks read it (Pool and the executor)."""

import os

import shoal

# Where the suite runs this program: this machine, or a Dask cluster.
CLUSTER = {"backend": "dask", "address": os.environ["DASK_ADDRESS"]} if "DASK_ADDRESS" in os.environ else {}

MODEL = None
CALLS = 0


def load(name):
    global MODEL
    MODEL = name


def use(i):
    global CALLS
    CALLS += 1  # a worker's own state: it survives from task to task
    return (MODEL, i, CALLS > 0)


if __name__ == "__main__":
    with shoal.Pool(2, initializer=load, initargs=("loaded",), **CLUSTER) as pool:
        print(pool.map(use, range(4)))
        print(pool.apply(use, (9,)))
    with shoal.ProcessPoolExecutor(2, initializer=load, initargs=("by the executor",), **CLUSTER) as ex:
        print(list(ex.map(use, range(3))))
        print(ex.submit(use, 7).result())

# Output:
# [('loaded', 0, True), ('loaded', 1, True), ('loaded', 2, True), ('loaded', 3, True)]
# ('loaded', 9, True)
# [('by the executor', 0, True), ('by the executor', 1, True), ('by the executor', 2, True)]
# ('by the executor', 7, True)
