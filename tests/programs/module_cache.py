"""A module-level cache that tasks fill: the next task in the same worker
finds what the last one stored."""

import os

import shoal

CLUSTER = {"backend": "dask", "address": os.environ["DASK_ADDRESS"]} if "DASK_ADDRESS" in os.environ else {}

CACHE = {}


def slow_square(x):
    hit = x in CACHE
    if not hit:
        CACHE[x] = x * x
    return CACHE[x], hit


if __name__ == "__main__":
    with shoal.Pool(2, **CLUSTER) as pool:
        results = pool.map(slow_square, [3] * 6 + [4] * 6, chunksize=1)
        print([value for value, _hit in results])
        # Two workers (each with its own cache) ran twelve tasks: some hit.
        print(sum(hit for _value, hit in results) >= 8)

# Output:
# [9, 9, 9, 9, 9, 9, 16, 16, 16, 16, 16, 16]
# True
