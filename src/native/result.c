/* result.c: the core of a pool's result object (shoal.AsyncResult's base).
 *
 * apply_async makes one per task, the scheduler thread delivers to it and
 * the caller reads it, so its state, constructor and the scheduler-side
 * methods (deliver, skip) are C; what waits, raises and runs callbacks is
 * the Python subclass (shoal._asyncresult.AsyncResult).
 *
 * Garbage collection: a result of the plain result class (the one handed to
 * result_type()) without callbacks is *untracked* while it waits: it then
 * refers only to its engine, its pool and its task, and none of them can
 * lead back to it except through the task, which the collector cannot see
 * anyway (see task.c).  Tracking a million pending results would make every
 * collection walk them.  It is tracked again as soon as it holds something
 * that could lead back to it: a callback, or a value that is not a plain
 * immutable one (an exception, whose traceback reaches the frame that
 * raised it, a list, any object).
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

static int
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

static int
Result_init(ResultObject *r, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"engine", "callback", "error_callback", NULL};
    PyObject *engine, *callback = Py_None, *error_callback = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO:AsyncResult", kwlist, &engine, &callback,
                                     &error_callback))
        return -1;
    Py_XSETREF(r->engine, Py_NewRef(engine));
    set_field(r, &r->callback, callback);
    set_field(r, &r->error_callback, error_callback);
    if (r->pool == NULL)
        r->pool = Py_NewRef(Py_None);
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
    Py_SETREF(r->task, Py_NewRef(Py_None));
    if (r->callback == Py_None && r->error_callback == Py_None) {
        r->delivered = 1;
        r->success = (char)ok;
        set_field(r, &r->value, args[2]);
        r->ready = 1;
        /* as the standard library does once a result is set */
        Py_SETREF(r->pool, Py_NewRef(Py_None));
        Py_RETURN_NONE;
    }
    return PyObject_CallMethod((PyObject *)r, "_finish", "OO", ok ? Py_True : Py_False, args[2]);
}

static PyObject *
Result_skip(ResultObject *r, PyObject *task)
{
    return PyBool_FromLong(r->delivered);
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
