"""Inter-process communication: framing over Unix sockets, descriptor passing,
and (built on them) Connection/Pipe and the queues."""
