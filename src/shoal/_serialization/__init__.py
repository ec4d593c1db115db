"""How objects cross process boundaries: the one ``dumps``/``loads`` pair.

* :mod:`._code`: how functions, classes and the globals they use travel
  (by reference where the receiver can import them, else by value, with
  one globals namespace per module in each receiving process), and
  :func:`starting_process`, which keeps a child from running a main module
  that is not a file.
* :mod:`._pickling`: :func:`dumps` / :func:`loads`, with large buffers
  through anonymous shared memory (out of band, pickle protocol 5), and
  errors that name what could not be pickled.
* :mod:`._exceptions`: a worker's exception on its way to the caller, its
  type and remote traceback kept.

Every face pickles through here: pool tasks and their hooks, the shared
object, actors, the Manager, pipes, queues, SharedDict, the Dask backend.
"""

from ._code import function_bytes as function_bytes
from ._code import starting_process as starting_process
from ._exceptions import pack_exception as pack_exception
from ._exceptions import unpack_exception as unpack_exception
from ._pickling import OOB_THRESHOLD as OOB_THRESHOLD
from ._pickling import LargeBuffers as LargeBuffers
from ._pickling import TooLarge as TooLarge
from ._pickling import dumps as dumps
from ._pickling import find_unpicklable as find_unpicklable
from ._pickling import loads as loads
from ._pickling import loads_with as loads_with
from ._pickling import name_unpicklable_item as name_unpicklable_item
from ._pickling import pickle_code as pickle_code

__all__ = (
    "OOB_THRESHOLD",
    "LargeBuffers",
    "TooLarge",
    "dumps",
    "find_unpicklable",
    "function_bytes",
    "loads",
    "loads_with",
    "name_unpicklable_item",
    "pack_exception",
    "pickle_code",
    "starting_process",
    "unpack_exception",
)
