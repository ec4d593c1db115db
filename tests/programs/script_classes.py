"""Classes, dataclasses and an exception class defined in the script, as
arguments and results, and the exception caught by its class."""

import dataclasses
import os

import shoal

CLUSTER = {"backend": "dask", "address": os.environ["DASK_ADDRESS"]} if "DASK_ADDRESS" in os.environ else {}


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int

    def norm1(self):
        return abs(self.x) + abs(self.y)


class Reading:
    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return f"Reading({self.value!r})"


class BadInput(ValueError):
    pass


def shift(p, dx):
    if dx < 0:
        raise BadInput(f"negative shift {dx}")
    return Point(p.x + dx, p.y), Reading(p.norm1())


if __name__ == "__main__":
    with shoal.Pool(2, **CLUSTER) as pool:
        results = pool.starmap(shift, [(Point(1, 2), 1), (Point(-3, 4), 2)])
        print(results)
        print(all(isinstance(p, Point) and isinstance(r, Reading) for p, r in results))
        try:
            pool.apply(shift, (Point(0, 0), -1))
        except BadInput as exc:
            print("caught BadInput:", exc)

# Output:
# [(Point(x=2, y=2), Reading(3)), (Point(x=-1, y=4), Reading(7))]
# True
# caught BadInput: negative shift -1
