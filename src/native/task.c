/* task.c: the pool engine's task record (shoal._engine.Task).
 *
 * One is made for every task submitted, so it is a C type for two reasons:
 * building one from positional arguments costs a fraction of a Python
 * __init__, and it is not tracked by the garbage collector, which otherwise
 * walks every pending task on each collection (a third of the per-task cost
 * of a trivial task was collections).
 *
 * Not being tracked is safe because the engine never lets a task sit in a
 * reference cycle it does not break itself: a task refers to its sink (the
 * result object), and the sink to the task only until the engine delivers
 * the outcome or drops the task, at which point the engine clears
 * task.sink (see Scheduler and Engine.release).  Everything else a task
 * holds -- the pickled payload, plain immutable arguments, the function's
 * cache entry, a tuple or list of descriptors -- cannot refer back to it.
 */
#include "shoal_native.h"
#include <structmember.h>

#define TASK_NFIELDS 12
#define TASK_REQUIRED 7

static const char *const task_field_names[TASK_NFIELDS] = {
    "id", "fn_id", "fn_ref", "mode", "data", "fds", "sink",
    "index", "timeout", "n", "kill_reason", "requeues",
};

static PyObject **
task_fields(TaskObject *t)
{
    return &t->id;
}

static PyObject *
Task_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    if (nargs > TASK_NFIELDS) {
        PyErr_Format(PyExc_TypeError, "Task takes at most %d arguments (%zd given)", TASK_NFIELDS, nargs);
        return NULL;
    }
    TaskObject *t = (TaskObject *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    PyObject **f = task_fields(t);
    for (Py_ssize_t i = 0; i < nargs; i++)
        f[i] = Py_NewRef(PyTuple_GET_ITEM(args, i));
    if (kwds != NULL) {
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(kwds, &pos, &key, &value)) {
            int found = 0;
            for (int i = 0; i < TASK_NFIELDS; i++) {
                if (PyUnicode_CompareWithASCIIString(key, task_field_names[i]) == 0) {
                    if (f[i] != NULL) {
                        PyErr_Format(PyExc_TypeError, "Task got multiple values for argument '%U'", key);
                        Py_DECREF(t);
                        return NULL;
                    }
                    f[i] = Py_NewRef(value);
                    found = 1;
                    break;
                }
            }
            if (!found) {
                PyErr_Format(PyExc_TypeError, "Task got an unexpected keyword argument '%U'", key);
                Py_DECREF(t);
                return NULL;
            }
        }
    }
    for (int i = 0; i < TASK_REQUIRED; i++) {
        if (f[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "Task missing required argument '%s'", task_field_names[i]);
            Py_DECREF(t);
            return NULL;
        }
    }
    /* (0, 1 and () are the interpreter's cached singletons: no allocation) */
    if (t->index == NULL)
        t->index = PyLong_FromLong(0);
    if (t->timeout == NULL)
        t->timeout = Py_NewRef(Py_None);
    if (t->n == NULL)
        t->n = PyLong_FromLong(1);
    if (t->kill_reason == NULL)
        t->kill_reason = Py_NewRef(Py_None);
    if (t->requeues == NULL)
        t->requeues = PyLong_FromLong(0);
    return (PyObject *)t;
}

static void
Task_dealloc(TaskObject *t)
{
    PyObject **f = task_fields(t);
    for (int i = 0; i < TASK_NFIELDS; i++)
        Py_CLEAR(f[i]);
    PyTypeObject *tp = Py_TYPE(t);
    tp->tp_free((PyObject *)t);
}

/* close_fds(registry): close the task's shared-memory descriptors and drop
 * them from the engine's registry (a set). */
static PyObject *
Task_close_fds(TaskObject *t, PyObject *registry)
{
    PyObject *fds = t->fds;
    if (fds == NULL || PyObject_Not(fds) == 1) {
        Py_RETURN_NONE;
    }
    PyObject *r = PyObject_CallMethod(registry, "difference_update", "O", fds);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    PyObject *seq = PySequence_Fast(fds, "a task's fds must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        int fd = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (fd == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        if (close(fd) < 0 && errno != EINTR) {
            /* os.close would raise: keep its behaviour */
            PyErr_SetFromErrno(PyExc_OSError);
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    Py_SETREF(t->fds, PyTuple_New(0));
    if (t->fds == NULL)
        return NULL;
    Py_RETURN_NONE;
}

/* raw_task(id, fn_id, fn_ref, mode, args, sink, timeout, limit) -> Task | None
 *
 * The engine's submit fast path: a Task carrying the argument tuple itself
 * (mode CALL_RAW) when every argument is of a plain immutable type -- int,
 * float, bool, None, complex exactly (not a subclass), or str / bytes
 * shorter than *limit* -- and None otherwise (the caller pickles them). */
PyObject *
raw_task(FASTCALL_ARGS)
{
    if (check_nargs("raw_task", nargs, 8, 8) < 0)
        return NULL;
    PyObject *call_args = args[4];
    if (!PyTuple_CheckExact(call_args))
        Py_RETURN_NONE;
    Py_ssize_t limit = PyLong_AsSsize_t(args[7]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(call_args);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyTuple_GET_ITEM(call_args, i);
        if (!is_plain_value(a))
            Py_RETURN_NONE;
        if ((PyUnicode_CheckExact(a) && PyUnicode_GET_LENGTH(a) >= limit) ||
            (PyBytes_CheckExact(a) && PyBytes_GET_SIZE(a) >= limit))
            Py_RETURN_NONE;
    }
    TaskObject *t = PyObject_New(TaskObject, &Task_Type);
    if (t == NULL)
        return NULL;
    t->id = Py_NewRef(args[0]);
    t->fn_id = Py_NewRef(args[1]);
    t->fn_ref = Py_NewRef(args[2]);
    t->mode = Py_NewRef(args[3]);
    t->data = Py_NewRef(call_args);
    t->fds = PyTuple_New(0);
    t->sink = Py_NewRef(args[5]);
    t->index = PyLong_FromLong(0);
    t->timeout = Py_NewRef(args[6]);
    t->n = PyLong_FromLong(1);
    t->kill_reason = Py_NewRef(Py_None);
    t->requeues = PyLong_FromLong(0);
    return (PyObject *)t;
}

/* Fields can be set, not deleted: the scheduler's C loops (result.c) read
 * them without checking for NULL. */
static int
Task_setattro(PyObject *self, PyObject *name, PyObject *value)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "a Task's fields cannot be deleted ('%U')", name);
        return -1;
    }
    return PyObject_GenericSetAttr(self, name, value);
}

static PyObject *
Task_repr(TaskObject *t)
{
    return PyUnicode_FromFormat("<shoal Task id=%R mode=%R n=%R>", t->id, t->mode, t->n);
}

static PyMethodDef Task_methods[] = {
    {"close_fds", (PyCFunction)Task_close_fds, METH_O,
     "close_fds($self, registry, /)\n--\n\n"
     "Close the task's shared-memory descriptors and drop them from the "
     "engine's *registry* (a set) of task descriptors."},
    {NULL, NULL, 0, NULL},
};

#define TASK_MEMBER(name, doc) \
    {#name, T_OBJECT_EX, offsetof(TaskObject, name), 0, doc}

static PyMemberDef Task_members[] = {
    TASK_MEMBER(id, "the task's id, unique in its engine"),
    TASK_MEMBER(fn_id, "id of the function workers cache (0: the function travels in data)"),
    TASK_MEMBER(fn_ref, "(fn, fn_id, fn_bytes) for the first send to a worker, or None"),
    TASK_MEMBER(mode, "how the worker calls the function (CALL, CALL_KW, CALL_RAW, MAP, STARMAP)"),
    TASK_MEMBER(data, "the pickled payload, or the arguments themselves (CALL_RAW)"),
    TASK_MEMBER(fds, "shared-memory descriptors of the pickled arguments (the task owns them)"),
    TASK_MEMBER(sink, "the result object the outcome goes to (None once delivered)"),
    TASK_MEMBER(index, "position of the chunk in its map"),
    TASK_MEMBER(timeout, "seconds the task may run, or None"),
    TASK_MEMBER(n, "items: 1 for a call, the chunk's length for a map chunk"),
    TASK_MEMBER(kill_reason, "why the scheduler killed (or gave up on) it, or None"),
    TASK_MEMBER(requeues, "times it ran again because its worker died before sending its result"),
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject Task_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shoal._native.Task",
    .tp_basicsize = sizeof(TaskObject),
    .tp_dealloc = (destructor)Task_dealloc,
    .tp_repr = (reprfunc)Task_repr,
    .tp_setattro = Task_setattro,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Task(id, fn_id, fn_ref, mode, data, fds, sink, index=0, timeout=None, n=1, "
              "kill_reason=None, requeues=0)\n--\n\n"
              "One unit of work of the pool engine: a call, or a chunk of a map.  Not "
              "tracked by the garbage collector (see task.c).",
    .tp_methods = Task_methods,
    .tp_members = Task_members,
    .tp_new = Task_new,
};
