"""Put on PYTHONPATH by the tests that run user programs (helpers.run_as_user):
makes the start method the program runs with the default, so the program
itself stays as a user wrote it.  (Python imports ``sitecustomize`` at
start-up, in spawned children too.)  The default only: a program that calls
``set_start_method()`` itself may still do so."""

import os

_method = os.environ.get("SHOAL_TEST_START_METHOD")
if _method:
    import multiprocessing.context

    # What the platform's default would be; set_start_method() is left free.
    multiprocessing.context._default_context._default_context = multiprocessing.context._concrete_contexts[
        _method
    ]
