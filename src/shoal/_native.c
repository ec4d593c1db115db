/* shoal._native: what Python cannot reach (atomics, robust process-shared
 * mutexes, futex wait/wake).  Filled in by the shared-data work. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "shoal._native", "Native core of shoal.", -1, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
