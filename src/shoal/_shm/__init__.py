"""Shared memory: anonymous segments passed by descriptor, zero-copy buffers,
shared arrays and the shared dict."""
