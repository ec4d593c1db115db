"""shoal's own ways to share a script's objects: an Actor of a class defined
in the script (its handle passed to pool tasks), and Pool(shared=...)."""

# Runs: shoal only (Actor, shared=), not on Dask.

import shoal


class Counter:
    def __init__(self, start):
        self.n = start

    def incr(self, k=1):
        self.n += k
        return self.n


class Model:
    def __init__(self, weight):
        self.weight = weight

    def predict(self, x):
        return self.weight * x


def bump(counter):
    return counter.incr(10) > 0


def predict(x):
    return shoal.shared().predict(x)


if __name__ == "__main__":
    with shoal.Actor(Counter, 5) as counter:
        print(counter.incr())
        with shoal.Pool(2) as pool:
            print(pool.map(bump, [counter] * 3))
        print(counter.incr(0))
    with shoal.Pool(2, shared=Model(3)) as pool:
        print(pool.map(predict, range(4)))

# Output:
# 6
# [True, True, True]
# 36
# [0, 3, 6, 9]
