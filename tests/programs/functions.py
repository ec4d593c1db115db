"""Every kind of callable a script makes: a module function, a
functools.partial of one, a nested function (a closure), a lambda, a bound
method of a script class, and a generator as imap's input."""

import functools
import os

import shoal

CLUSTER = {"backend": "dask", "address": os.environ["DASK_ADDRESS"]} if "DASK_ADDRESS" in os.environ else {}

OFFSET = 100


def add(x, y):
    return x + y + OFFSET


def make_scaler(k):
    def scale(x):
        return k * x + OFFSET

    return scale


class Greeter:
    def __init__(self, greeting):
        self.greeting = greeting

    def greet(self, name):
        return f"{self.greeting}, {name}"


def numbers(n):
    yield from range(n)


if __name__ == "__main__":
    with shoal.Pool(2, **CLUSTER) as pool:
        print(pool.map(functools.partial(add, 1), range(3)))
        print(pool.map(make_scaler(3), range(3)))
        print(pool.map(lambda x: x * x + OFFSET, range(3)))
        print(pool.map(Greeter("hello").greet, ["ann", "bob"]))
        print(list(pool.imap(functools.partial(add, 0), numbers(4))))
        print(sorted(pool.imap_unordered(make_scaler(2), numbers(4))))

# Output:
# [101, 102, 103]
# [100, 103, 106]
# [100, 101, 104]
# ['hello, ann', 'hello, bob']
# [100, 101, 102, 103]
# [100, 102, 104, 106]
