/* result.c: the core of a pool's result object (shoal.AsyncResult's base).
 *
 * apply_async makes one per task, the scheduler thread delivers to it and
 * the caller reads it, so its state, constructor and the scheduler-side
 * methods (deliver, skip) are C; what waits, raises and runs callbacks is
 * the Python subclass (shoal._asyncresult.AsyncResult).
 *
 * Garbage collection: a result of the plain result class (the one handed to
 * result_type()) without callbacks is *untracked* while it waits: it then
 * refers only to its engine, its pool and its task.  While it waits it is
 * alive anyway (the engine's queue holds its task, which holds it), and the
 * engine delivers to it or fails it before it lets go of the task.  Once
 * delivered it lets go of its engine and pool too (user objects, such as a
 * pool's initargs, may lead back to it through them: a cycle the collector
 * could not see) and keeps only a plain value.  Tracking a million pending
 * results would make every collection walk them.  It is tracked again as
 * soon as it holds something that could lead back to it: a callback, or a
 * value that is not a plain immutable one (an exception, whose traceback
 * reaches the frame that raised it, a list, any object).
 */
#include "shoal_native.h"
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    PyObject *engine;
    PyObject *callback;
    PyObject *error_callback;
    PyObject *pool;
    PyObject *task;
    PyObject *value;
    char ready;
    char delivered;
    char success;
} ResultObject;

/* The plain result class, whose instances may be untracked (result_type). */
static PyTypeObject *plain_type = NULL;

/* A value of an exact type that is immutable, always picklable and refers to
 * nothing (None, int, float, str, bool, bytes, complex): the results that
 * need no tracking, and the arguments raw_task (task.c) lets travel unpickled. */
int
is_plain_value(PyObject *v)
{
    return v == Py_None || PyLong_CheckExact(v) || PyFloat_CheckExact(v) || PyUnicode_CheckExact(v) ||
           PyBool_Check(v) || PyBytes_CheckExact(v) || PyComplex_CheckExact(v);
}

static void
track(ResultObject *r)
{
    if (!PyObject_GC_IsTracked((PyObject *)r))
        PyObject_GC_Track((PyObject *)r);
}

static void
set_field(ResultObject *r, PyObject **field, PyObject *value)
{
    if (value != NULL && !is_plain_value(value))
        track(r);
    Py_XSETREF(*field, Py_XNewRef(value));
}

/* AsyncResult(engine, callback=None, error_callback=None, pool=None) */
static int
Result_init(ResultObject *r, PyObject *args, PyObject *kwds)
{
    PyObject *engine, *callback = Py_None, *error_callback = Py_None, *pool = Py_None;
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    if (kwds == NULL && nargs >= 1 && nargs <= 4) {
        /* the per-task path: positional arguments only */
        engine = PyTuple_GET_ITEM(args, 0);
        if (nargs > 1)
            callback = PyTuple_GET_ITEM(args, 1);
        if (nargs > 2)
            error_callback = PyTuple_GET_ITEM(args, 2);
        if (nargs > 3)
            pool = PyTuple_GET_ITEM(args, 3);
    }
    else {
        static char *kwlist[] = {"engine", "callback", "error_callback", "pool", NULL};
        if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OOO:AsyncResult", kwlist, &engine, &callback,
                                         &error_callback, &pool))
            return -1;
    }
    Py_XSETREF(r->engine, Py_NewRef(engine));
    set_field(r, &r->callback, callback);
    set_field(r, &r->error_callback, error_callback);
    Py_XSETREF(r->pool, Py_NewRef(pool));
    if (r->task == NULL)
        r->task = Py_NewRef(Py_None);
    if (r->value == NULL)
        r->value = Py_NewRef(Py_None);
    r->ready = r->delivered = r->success = 0;
    if (Py_TYPE(r) == plain_type && callback == Py_None && error_callback == Py_None &&
        PyObject_GC_IsTracked((PyObject *)r))
        PyObject_GC_UnTrack(r);
    return 0;
}

static int
Result_traverse(ResultObject *r, visitproc visit, void *arg)
{
    Py_VISIT(r->engine);
    Py_VISIT(r->callback);
    Py_VISIT(r->error_callback);
    Py_VISIT(r->pool);
    Py_VISIT(r->task);
    Py_VISIT(r->value);
    return 0;
}

static int
Result_clear(ResultObject *r)
{
    Py_CLEAR(r->engine);
    Py_CLEAR(r->callback);
    Py_CLEAR(r->error_callback);
    Py_CLEAR(r->pool);
    Py_CLEAR(r->task);
    Py_CLEAR(r->value);
    return 0;
}

static void
Result_dealloc(ResultObject *r)
{
    PyTypeObject *tp = Py_TYPE(r);
    PyObject_GC_UnTrack(r);
    Result_clear(r);
    /* (a heap subclass's subtype_dealloc, which calls this, releases the type) */
    tp->tp_free((PyObject *)r);
}

/* deliver(task, ok, value): the engine's ResultSink protocol (scheduler
 * thread).  Without callbacks the result is settled here; otherwise the
 * Python subclass's _finish(ok, value) hands the callback to the callback
 * thread. */
static PyObject *
Result_deliver(ResultObject *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("deliver", nargs, 3, 3) < 0)
        return NULL;
    if (r->delivered)
        Py_RETURN_NONE;
    int ok = PyObject_IsTrue(args[1]);
    if (ok < 0)
        return NULL;
    /* break the task <-> result cycle: nothing is left to cancel */
    /* (X: a field is NULL in an object made without __init__, or deleted) */
    Py_XSETREF(r->task, Py_NewRef(Py_None));
    if ((r->callback == NULL || r->callback == Py_None) &&
        (r->error_callback == NULL || r->error_callback == Py_None)) {
        r->delivered = 1;
        r->success = (char)ok;
        set_field(r, &r->value, args[2]);
        r->ready = 1;
        /* as the standard library does once a result is set; and the engine
         * too (after ready: see wait()), so an untracked finished result
         * refers to nothing that could lead back to it (a user object its
         * pool's initargs hold, say), a cycle the collector could not see */
        Py_XSETREF(r->engine, Py_NewRef(Py_None));
        Py_XSETREF(r->pool, Py_NewRef(Py_None));
        Py_RETURN_NONE;
    }
    return PyObject_CallMethod((PyObject *)r, "_finish", "OO", ok ? Py_True : Py_False, args[2]);
}

static PyObject *
Result_skip(ResultObject *r, PyObject *task)
{
    return PyBool_FromLong(r->delivered);
}

/* get(timeout=None): the value of a finished, successful task at once;
 * anything else (waiting, raising) is the subclass's _get(timeout), so a
 * raised exception's traceback shows where, as the standard library's. */
static PyObject *
Result_get(ResultObject *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    /* (a keyword goes through the checks below: get(timeuot=1) raises) */
    if (r->ready && r->success && r->value != NULL && nargs <= 1 && nkw == 0)
        return Py_NewRef(r->value);
    PyObject *timeout = Py_None;
    if (nargs + nkw > 1) {
        PyErr_Format(PyExc_TypeError, "get() takes at most 1 argument (%zd given)", nargs + nkw);
        return NULL;
    }
    if (nargs == 1)
        timeout = args[0];
    else if (nkw == 1) {
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0) {
            PyErr_Format(PyExc_TypeError, "get() got an unexpected keyword argument '%U'",
                         PyTuple_GET_ITEM(kwnames, 0));
            return NULL;
        }
        timeout = args[0];
    }
    return PyObject_CallMethod((PyObject *)r, "_get", "O", timeout);
}

static PyObject *
Result_ready(ResultObject *r, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(r->ready);
}

#define OBJECT_GETSET(name)                                              \
    static PyObject *Result_get_##name(ResultObject *r, void *c)       \
    {                                                                    \
        return Py_NewRef(r->name ? r->name : Py_None);                   \
    }                                                                    \
    static int Result_set_##name(ResultObject *r, PyObject *v, void *c) \
    {                                                                    \
        set_field(r, &r->name, v ? v : Py_None);                         \
        return 0;                                                        \
    }

OBJECT_GETSET(callback)
OBJECT_GETSET(error_callback)
OBJECT_GETSET(value)

static PyGetSetDef Result_getset[] = {
    {"_callback", (getter)Result_get_callback, (setter)Result_set_callback, NULL, NULL},
    {"_error_callback", (getter)Result_get_error_callback, (setter)Result_set_error_callback, NULL, NULL},
    {"_value", (getter)Result_get_value, (setter)Result_set_value, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Result_members[] = {
    {"_engine", T_OBJECT, offsetof(ResultObject, engine), 0, NULL},
    {"_pool", T_OBJECT, offsetof(ResultObject, pool), 0, NULL},
    {"_task", T_OBJECT, offsetof(ResultObject, task), 0, NULL},
    {"_ready", T_BOOL, offsetof(ResultObject, ready), 0, NULL},
    {"_success", T_BOOL, offsetof(ResultObject, success), 0, NULL},
    {"delivered", T_BOOL, offsetof(ResultObject, delivered), 0,
     "True once the outcome is in (callbacks may still be running)"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Result_methods[] = {
    {"deliver", (PyCFunction)(void (*)(void))Result_deliver, METH_FASTCALL,
     "deliver($self, task, ok, value, /)\n--\n\n"
     "The engine's ResultSink protocol (scheduler thread): the task's value when "
     "*ok*, else its exception."},
    {"skip", (PyCFunction)Result_skip, METH_O,
     "skip($self, task, /)\n--\n\n"
     "The engine's ResultSink protocol (scheduler thread): True when the task "
     "need not run (the result is settled)."},
    {"get", (PyCFunction)(void (*)(void))Result_get, METH_FASTCALL | METH_KEYWORDS,
     "get($self, /, timeout=None)\n--\n\n"
     "Return the result, or raise the task's exception.\n\n"
     "Raises:\n    multiprocessing.TimeoutError: not ready within *timeout* seconds."},
    {"ready", (PyCFunction)Result_ready, METH_NOARGS,
     "ready($self, /)\n--\n\nTrue once the task finished (and its callback, if any, ran)."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject Result_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shoal._native.ResultSlot",
    .tp_basicsize = sizeof(ResultObject),
    .tp_dealloc = (destructor)Result_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The state of a pool's result object; see shoal.AsyncResult.",
    .tp_traverse = (traverseproc)Result_traverse,
    .tp_clear = (inquiry)Result_clear,
    .tp_methods = Result_methods,
    .tp_members = Result_members,
    .tp_getset = Result_getset,
    .tp_init = (initproc)Result_init,
    .tp_new = PyType_GenericNew,
};

/* new_result(engine, callback, error_callback, pool): a new instance of the
 * plain result class, as plain_type(engine, callback, error_callback, pool)
 * but without building an argument tuple or dispatching to tp_init (one is
 * made per apply_async). */
PyObject *
new_result(FASTCALL_ARGS)
{
    if (check_nargs("new_result", nargs, 4, 4) < 0)
        return NULL;
    if (plain_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "new_result(): no plain result class registered (result_type)");
        return NULL;
    }
    ResultObject *r = (ResultObject *)plain_type->tp_alloc(plain_type, 0);
    if (r == NULL)
        return NULL;
    r->engine = Py_NewRef(args[0]);
    r->callback = Py_NewRef(args[1]);
    r->error_callback = Py_NewRef(args[2]);
    r->pool = Py_NewRef(args[3]);
    r->task = Py_NewRef(Py_None);
    r->value = Py_NewRef(Py_None);
    if (args[1] == Py_None && args[2] == Py_None) {
        if (PyObject_GC_IsTracked((PyObject *)r))
            PyObject_GC_UnTrack(r);
    }
    else
        track(r);
    return (PyObject *)r;
}

/* result_type(cls): make cls the plain result class whose instances without
 * callbacks are untracked while they wait (see the top of this file). */
PyObject *
native_result_type(PyObject *module, PyObject *cls)
{
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &Result_Type)) {
        PyErr_SetString(PyExc_TypeError, "result_type() takes a subclass of ResultSlot");
        return NULL;
    }
    Py_XSETREF(plain_type, (PyTypeObject *)Py_NewRef(cls));
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------
 * The scheduler's per-task loops (shoal._engine._scheduler)
 * ---------------------------------------------------------------------- */

static PyObject *deliver_str = NULL, *skip_str = NULL;

static int
intern_names(void)
{
    if (deliver_str == NULL) {
        deliver_str = PyUnicode_InternFromString("deliver");
        skip_str = PyUnicode_InternFromString("skip");
        if (deliver_str == NULL || skip_str == NULL)
            return -1;
    }
    return 0;
}

static int
has_items(PyObject *seq)
{
    if (PyTuple_CheckExact(seq))
        return PyTuple_GET_SIZE(seq) != 0;
    if (PyList_CheckExact(seq))
        return PyList_GET_SIZE(seq) != 0;
    return PyObject_IsTrue(seq);
}

/* deliver_plain(tasks, kinds, values, start, raw) -> int
 *
 * Deliver values[i] to tasks[i].sink for i = start, start+1, ... while the
 * outcome is plain: kinds[i] == raw (the value itself, a success) and the
 * task has no descriptors, no time limit and no kill reason.  Clears each
 * delivered task's sink.  Returns the index of the first outcome that needs
 * the general path (or len(kinds)); the caller handles it and calls again,
 * so outcomes are delivered in order. */
PyObject *
deliver_plain(FASTCALL_ARGS)
{
    if (check_nargs("deliver_plain", nargs, 5, 5) < 0 || intern_names() < 0)
        return NULL;
    PyObject *tasks = args[0], *kinds = args[1], *values = args[2];
    if (!PyList_CheckExact(tasks) || !PyList_CheckExact(kinds) || !PyList_CheckExact(values)) {
        PyErr_SetString(PyExc_TypeError, "deliver_plain() takes three lists");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[3]);
    long raw = PyLong_AsLong(args[4]);
    if ((i == -1 || raw == -1) && PyErr_Occurred())
        return NULL;
    if (i < 0) {
        PyErr_SetString(PyExc_ValueError, "deliver_plain(): start must be >= 0");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(kinds);
    if (PyList_GET_SIZE(tasks) < n || PyList_GET_SIZE(values) < n) {
        PyErr_SetString(PyExc_ValueError, "deliver_plain(): fewer tasks or values than kinds");
        return NULL;
    }
    for (; i < n; i++) {
        /* A deliver() below runs Python code (a subclass's, a Future's): if
         * anything shrank a list meanwhile, stop rather than read past it. */
        if (i >= PyList_GET_SIZE(kinds) || i >= PyList_GET_SIZE(tasks) || i >= PyList_GET_SIZE(values))
            break;
        PyObject *kind = PyList_GET_ITEM(kinds, i);
        int overflow;
        if (!PyLong_CheckExact(kind) || PyLong_AsLongAndOverflow(kind, &overflow) != raw || overflow)
            break;
        PyObject *item = PyList_GET_ITEM(tasks, i);
        if (Py_TYPE(item) != &Task_Type)
            break;
        TaskObject *task = (TaskObject *)item;
        if (task->timeout != Py_None || task->kill_reason != Py_None || task->sink == NULL)
            break;
        int fds = has_items(task->fds);
        if (fds != 0) {
            if (fds < 0)
                return NULL;
            break;
        }
        PyObject *sink = Py_NewRef(task->sink);
        PyObject *call[4] = {sink, item, Py_True, PyList_GET_ITEM(values, i)};
        PyObject *r;
        if (PyObject_TypeCheck(sink, &Result_Type) && Py_TYPE(sink) == plain_type)
            r = Result_deliver((ResultObject *)sink, call + 1, 3);
        else
            r = PyObject_VectorcallMethod(deliver_str, call, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(sink);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
        Py_XSETREF(task->sink, Py_NewRef(Py_None));
    }
    return PyLong_FromSsize_t(i);
}

/* drop_skipped(batch) -> list
 *
 * Remove from the list *batch*, in place, the tasks whose sink says skip()
 * (nobody wants the outcome any more), and return them. */
PyObject *
drop_skipped(FASTCALL_ARGS)
{
    if (check_nargs("drop_skipped", nargs, 1, 1) < 0 || intern_names() < 0)
        return NULL;
    PyObject *batch = args[0];
    if (!PyList_CheckExact(batch)) {
        PyErr_SetString(PyExc_TypeError, "drop_skipped() takes a list");
        return NULL;
    }
    PyObject *skipped = PyList_New(0);
    if (skipped == NULL)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(batch), kept = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(batch, i);
        int skip;
        PyObject *sink = Py_TYPE(item) == &Task_Type ? ((TaskObject *)item)->sink
                                                     : PyObject_GetAttrString(item, "sink");
        if (sink == NULL)
            goto error;
        if (Py_TYPE(item) == &Task_Type)
            Py_INCREF(sink);
        if (Py_TYPE(sink) == plain_type)
            skip = ((ResultObject *)sink)->delivered;
        else {
            PyObject *call[2] = {sink, item};
            PyObject *r = PyObject_VectorcallMethod(skip_str, call, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            skip = r == NULL ? -1 : PyObject_IsTrue(r);
            Py_XDECREF(r);
        }
        Py_DECREF(sink);
        if (skip < 0)
            goto error;
        if (skip) {
            if (PyList_Append(skipped, item) < 0)
                goto error;
        }
        else {
            if (kept != i) {
                /* move item from i to kept; the slot at kept was moved out before */
                PyObject *old = PyList_GET_ITEM(batch, kept);
                PyList_SET_ITEM(batch, kept, Py_NewRef(item));
                Py_DECREF(old);
            }
            kept++;
        }
    }
    if (kept != n && PyList_SetSlice(batch, kept, n, NULL) < 0)
        goto error;
    return skipped;
error:
    Py_DECREF(skipped);
    return NULL;
}

/* batch_columns(batch) -> (ids, fn_ids, modes, datas, nfds, timed)
 *
 * The wire format of a batch (see shoal._engine._worker.BATCH): one list per
 * field of its tasks, nfds None when no task has descriptors, and how many
 * tasks have a time limit. */
PyObject *
batch_columns(FASTCALL_ARGS)
{
    if (check_nargs("batch_columns", nargs, 1, 1) < 0)
        return NULL;
    PyObject *batch = args[0];
    if (!PyList_CheckExact(batch)) {
        PyErr_SetString(PyExc_TypeError, "batch_columns() takes a list of tasks");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(batch);
    PyObject *ids = PyList_New(n), *fids = PyList_New(n), *modes = PyList_New(n), *datas = PyList_New(n),
             *nfds = PyList_New(n);
    Py_ssize_t timed = 0, with_fds = 0;
    if (ids == NULL || fids == NULL || modes == NULL || datas == NULL || nfds == NULL)
        goto error;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(batch, i);
        if (Py_TYPE(item) != &Task_Type) {
            PyErr_SetString(PyExc_TypeError, "batch_columns() takes a list of tasks");
            goto error;
        }
        TaskObject *t = (TaskObject *)item;
        PyList_SET_ITEM(ids, i, Py_NewRef(t->id));
        PyList_SET_ITEM(fids, i, Py_NewRef(t->fn_id));
        PyList_SET_ITEM(modes, i, Py_NewRef(t->mode));
        PyList_SET_ITEM(datas, i, Py_NewRef(t->data));
        Py_ssize_t k = PyObject_Size(t->fds);
        if (k < 0)
            goto error;
        with_fds += k;
        PyObject *count = PyLong_FromSsize_t(k);
        if (count == NULL)
            goto error;
        PyList_SET_ITEM(nfds, i, count);
        if (t->timeout != Py_None)
            timed++;
    }
    if (!with_fds)
        Py_SETREF(nfds, Py_NewRef(Py_None));
    return Py_BuildValue("(NNNNNn)", ids, fids, modes, datas, nfds, timed);
error:
    Py_XDECREF(ids);
    Py_XDECREF(fids);
    Py_XDECREF(modes);
    Py_XDECREF(datas);
    Py_XDECREF(nfds);
    return NULL;
}
