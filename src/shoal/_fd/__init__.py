"""Descriptors and anonymous shared memory: the bottom layer of shoal.

Everything shoal shares between processes is a file descriptor, never a name:
the kernel frees a segment or a socket when the last process holding it is
gone, however it ends.  This package is the one place that knows how a
descriptor travels and how anonymous memory is made:

* passing (:mod:`._passing`): an object that owns a descriptor reduces it
  with :func:`reduce_fd`; a sender collects the descriptors of what it
  pickles (:func:`collecting_fds` makes the list, :func:`sending_fds` uses
  the sender's) and passes them beside its message as ``SCM_RIGHTS``; a
  receiver unpickles inside :func:`providing_fds`.  Outside those contexts
  :mod:`multiprocessing`'s own descriptor passing is used.
* ancillary data (:mod:`._ancillary`): the ``SCM_RIGHTS`` control messages
  themselves (:func:`fds_ancillary` to send, :func:`received_fds` to read,
  :data:`MAX_FDS` per message, :data:`ANC_SIZE` to receive them).
* segments (:mod:`._segment`): memfds (:func:`create_fd`,
  :func:`fd_from_buffer`), a mapped :class:`Segment`, and views of
  received memfds that keep no descriptor (:func:`map_received`,
  :func:`map_private_fd`); what a size that another process
  announced may be (:data:`MAX_PEER_SIZE`, :func:`peer_size_error`,
  :func:`check_fd_holds`), checked before anything is allocated; memfds
  sealed against shrinking, and the check that a received one is
  (:func:`check_sealed`).
* limits (:mod:`._limits`): :func:`exhausted` turns the system's refusal
  (no descriptor, no memory, no process) into an error that says what ran
  out and what to do; :data:`FAULTS` (``SHOAL_FAULT``) makes segment
  creation, or the mapping of a received one, fail on purpose, for tests.
* warm segments (:mod:`._warm`): reusable segments whose readers the kernel
  tracks with file-lock leases (:class:`WarmSegments`, :func:`map_leased`);
  snapshots (:mod:`._snapshots`): the segment already holding an array sent
  again is reused while the kernel reports no write to it
  (:meth:`WarmSegments.lease_copy`, :data:`SNAPSHOT_MIN`).

Every layer above (serialization, IPC, shared memory, the engine) uses these
names and nothing else of this package.

Importing it also tells the native core (:mod:`shoal._native`, a sibling of
:mod:`shoal.exceptions` that cannot import it) which error corrupt shared
memory raises: :class:`~shoal.exceptions.CorruptDataError`.
"""

from .. import _native
from ..exceptions import CorruptDataError
from ._ancillary import ANC_SIZE as ANC_SIZE
from ._ancillary import MAX_FDS as MAX_FDS
from ._ancillary import fds_ancillary as fds_ancillary
from ._ancillary import received_fds as received_fds
from ._limits import FAULTS as FAULTS
from ._limits import exhausted as exhausted
from ._passing import collecting as collecting
from ._passing import collecting_fds as collecting_fds
from ._passing import providing_fds as providing_fds
from ._passing import reduce_fd as reduce_fd
from ._passing import sending_fds as sending_fds
from ._passing import swap_sending as swap_sending
from ._segment import MAX_PEER_SIZE as MAX_PEER_SIZE
from ._segment import Segment as Segment
from ._segment import check_fd_holds as check_fd_holds
from ._segment import check_sealed as check_sealed
from ._segment import create_fd as create_fd
from ._segment import fd_from_buffer as fd_from_buffer
from ._segment import map_private as map_private
from ._segment import map_private_fd as map_private_fd
from ._segment import map_received as map_received
from ._segment import peer_size_error as peer_size_error
from ._snapshots import MIN_BYTES as SNAPSHOT_MIN
from ._warm import WarmSegments as WarmSegments
from ._warm import map_leased as map_leased

_native.set_corrupt_error(CorruptDataError)

__all__ = (
    "ANC_SIZE",
    "FAULTS",
    "MAX_FDS",
    "MAX_PEER_SIZE",
    "SNAPSHOT_MIN",
    "Segment",
    "WarmSegments",
    "check_fd_holds",
    "check_sealed",
    "collecting",
    "collecting_fds",
    "create_fd",
    "exhausted",
    "fd_from_buffer",
    "fds_ancillary",
    "map_leased",
    "map_private",
    "map_private_fd",
    "map_received",
    "peer_size_error",
    "providing_fds",
    "received_fds",
    "reduce_fd",
    "sending_fds",
    "swap_sending",
)
