"""The pool engine: scheduler thread, worker loop, batching, crash detection."""
