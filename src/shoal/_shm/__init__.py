"""Shared memory: anonymous segments passed by descriptor, zero-copy buffers
and the shared dict."""
