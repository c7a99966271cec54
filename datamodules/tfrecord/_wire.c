/* Fast path for parse_example: scan a serialized tf.Example and copy out the wanted features once.
 *
 * The protobuf runtime (upb) copies a 100 KB payload three times on the way to a Python `bytes`
 * (memoryview -> bytes, into its arena, out to Python); this scanner reads the caller's buffer in
 * place and copies each wanted value exactly once. It handles the layout every writer produces
 * (TensorFlow, the Python runtime, ours): length-delimited messages, packed numeric lists, each
 * Feature's list once. Anything else makes it answer None and the caller parses the record with upb,
 * so results and errors are upb's: unpacked or split lists, a map key twice (in one entry or in two),
 * a map entry with unknown fields (upb keeps it as unknown data, not in the map), groups, wire types
 * that do not match a known field, keys that are not UTF-8, truncation.
 *
 * Field numbers are those of example.proto: Example.features = 1; Features.feature = 1
 * (map<string, Feature>: entry key = 1, value = 2); Feature.bytes_list = 1, float_list = 2,
 * int64_list = 3; each list's values = 1.
 *
 * Built by setup.py as datamodules.tfrecord._wire (optional: without a C compiler the package
 * parses with upb alone).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { DONE = 0, FALLBACK = 1, FAILED = -1 }; /* FAILED: a Python exception is set */

typedef struct {
    const uint8_t *p, *end;
} span;

static PyObject *kind_names[4]; /* NULL, "bytes", "float", "int64": the dtype names of features.py */

static inline int read_varint(span *s, uint64_t *out) {
    uint64_t value = 0;
    for (int i = 0; i < 10; i++) {
        if (s->p >= s->end) return 0;
        uint8_t byte = *s->p++;
        value |= (uint64_t)(byte & 0x7F) << (7 * i);
        if (!(byte & 0x80)) {
            *out = value;
            return 1;
        }
    }
    return 0;
}

/* The next tag; 0 on anything upb might treat specially (field number 0, > 32 bits, truncation). */
static inline int read_tag(span *s, uint32_t *field, int *wire_type) {
    uint64_t tag;
    if (!read_varint(s, &tag) || tag > 0xFFFFFFFFu || (tag >> 3) == 0) return 0;
    *field = (uint32_t)(tag >> 3);
    *wire_type = (int)(tag & 7);
    return 1;
}

/* A length-delimited body after its tag. */
static inline int read_body(span *s, span *body) {
    uint64_t length;
    if (!read_varint(s, &length) || length > (uint64_t)(s->end - s->p) || length > INT32_MAX) return 0;
    body->p = s->p;
    body->end = s->p + length;
    s->p = body->end;
    return 1;
}

/* Skip an unknown field of wire type varint, fixed64, length-delimited or fixed32 (groups: fall back). */
static inline int skip_field(span *s, int wire_type) {
    uint64_t ignored;
    span body;
    switch (wire_type) {
    case 0: return read_varint(s, &ignored);
    case 1: if (s->end - s->p < 8) return 0; s->p += 8; return 1;
    case 2: return read_body(s, &body);
    case 5: if (s->end - s->p < 4) return 0; s->p += 4; return 1;
    default: return 0;
    }
}

/* BytesList: a list of `bytes`, each value copied once. */
static int bytes_list(span s, int keep, PyObject **out) {
    PyObject *list = keep ? PyList_New(0) : NULL;
    if (keep && !list) return FAILED;
    uint32_t field;
    int wire_type;
    span value;
    while (s.p < s.end) {
        if (!read_tag(&s, &field, &wire_type)) goto fallback;
        if (field == 1) {
            if (wire_type != 2 || !read_body(&s, &value)) goto fallback;
            if (keep) {
                PyObject *item = PyBytes_FromStringAndSize((const char *)value.p, value.end - value.p);
                if (!item || PyList_Append(list, item) < 0) {
                    Py_XDECREF(item);
                    Py_DECREF(list);
                    return FAILED;
                }
                Py_DECREF(item);
            }
        } else if (!skip_field(&s, wire_type)) goto fallback;
    }
    *out = list;
    return DONE;
fallback:
    Py_XDECREF(list);
    return FALLBACK;
}

/* FloatList / Int64List: one packed run of values, as a bytearray of little-endian float32 or native
 * int64 (NumPy wraps it without a copy; float bits, NaN payloads included, are kept exactly). */
static int packed_list(span s, int is_float, int keep, PyObject **out) {
    uint32_t field;
    int wire_type;
    span run = {NULL, NULL};
    int runs = 0;
    while (s.p < s.end) {
        if (!read_tag(&s, &field, &wire_type)) return FALLBACK;
        if (field == 1) {
            if (wire_type != 2 || runs++ || !read_body(&s, &run)) return FALLBACK; /* unpacked or split */
        } else if (!skip_field(&s, wire_type)) return FALLBACK;
    }
    Py_ssize_t size = run.end - run.p;
    if (is_float) {
        if (size % 4) return FALLBACK;
        if (keep && !(*out = PyByteArray_FromStringAndSize((const char *)run.p, size))) return FAILED;
        return DONE;
    }
    Py_ssize_t count = 0; /* each varint ends in a byte below 0x80 */
    for (const uint8_t *q = run.p; q < run.end; q++) count += *q < 0x80;
    if (size && run.end[-1] >= 0x80) return FALLBACK;
    PyObject *array = keep ? PyByteArray_FromStringAndSize(NULL, count * 8) : NULL;
    if (keep && !array) return FAILED;
    int64_t *values = keep ? (int64_t *)PyByteArray_AS_STRING(array) : NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t value;
        if (!read_varint(&run, &value)) { /* a varint over 10 bytes */
            Py_XDECREF(array);
            return FALLBACK;
        }
        if (keep) values[i] = (int64_t)value;
    }
    *out = array;
    return DONE;
}

/* Feature: its kind (0 when none is set) and values; a second kind field (merge or switch) falls back. */
static int feature(span s, int keep, int *kind, PyObject **values) {
    uint32_t field;
    int wire_type, status;
    span list;
    *kind = 0;
    *values = NULL;
    while (s.p < s.end) {
        if (!read_tag(&s, &field, &wire_type)) goto fallback;
        if (field >= 1 && field <= 3) {
            if (wire_type != 2 || *kind || !read_body(&s, &list)) goto fallback;
            *kind = (int)field;
            status = field == 1 ? bytes_list(list, keep, values) : packed_list(list, field == 2, keep, values);
            if (status != DONE) return status;
        } else if (!skip_field(&s, wire_type)) goto fallback;
    }
    return DONE;
fallback:
    Py_CLEAR(*values);
    return FALLBACK;
}

/* One map entry of Features.feature into `found` (when `wanted` is None or holds the key). */
static int map_entry(span s, PyObject *wanted, PyObject *found) {
    uint32_t field;
    int wire_type, kind, status;
    span key = {(const uint8_t *)"", (const uint8_t *)""}, value = {NULL, NULL};
    int have_key = 0, have_value = 0;
    while (s.p < s.end) {
        if (!read_tag(&s, &field, &wire_type)) return FALLBACK;
        if (field == 1) {
            if (wire_type != 2 || have_key++ || !read_body(&s, &key)) return FALLBACK;
        } else if (field == 2) {
            if (wire_type != 2 || have_value++ || !read_body(&s, &value)) return FALLBACK;
        } else return FALLBACK; /* upb keeps an entry with unknown fields as unknown data, not in the map */
    }
    PyObject *name = PyUnicode_DecodeUTF8((const char *)key.p, key.end - key.p, NULL);
    if (!name) {
        PyErr_Clear(); /* upb rejects the key: let it say so */
        return FALLBACK;
    }
    int keep = wanted == Py_None ? 1 : PySequence_Contains(wanted, name);
    if (keep < 0) goto failed;
    if (keep) {
        int present = PyDict_Contains(found, name);
        if (present < 0) goto failed;
        if (present) { /* a key seen twice: map merge rules are upb's business */
            Py_DECREF(name);
            return FALLBACK;
        }
    }
    PyObject *values = NULL;
    if (have_value) {
        status = feature(value, keep, &kind, &values);
        if (status != DONE) {
            Py_DECREF(name);
            return status;
        }
    } else kind = 0;
    if (keep) {
        PyObject *item = PyTuple_Pack(2, kind ? kind_names[kind] : Py_None, values ? values : Py_None);
        Py_XDECREF(values);
        if (!item || PyDict_SetItem(found, name, item) < 0) {
            Py_XDECREF(item);
            goto failed;
        }
        Py_DECREF(item);
    }
    Py_DECREF(name);
    return DONE;
failed:
    Py_DECREF(name);
    return FAILED;
}

static int features_message(span s, PyObject *wanted, PyObject *found) {
    uint32_t field;
    int wire_type, status;
    span entry;
    while (s.p < s.end) {
        if (!read_tag(&s, &field, &wire_type)) return FALLBACK;
        if (field == 1) {
            if (wire_type != 2 || !read_body(&s, &entry)) return FALLBACK;
            if ((status = map_entry(entry, wanted, found)) != DONE) return status;
        } else if (!skip_field(&s, wire_type)) return FALLBACK;
    }
    return DONE;
}

PyDoc_STRVAR(example_features_doc,
"example_features(payload, wanted) -> dict | None\n\n"
"{key: (dtype, values)} for the features of a serialized tf.Example whose key is in `wanted`\n"
"(None: all). dtype is 'bytes' (values: list of bytes), 'float' (bytearray of little-endian\n"
"float32), 'int64' (bytearray of native int64) or None (a Feature with no list set; values None).\n"
"Returns None for any layout it leaves to the protobuf runtime (see the module comment).");

static PyObject *example_features(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "example_features(payload, wanted) takes 2 arguments");
        return NULL;
    }
    Py_buffer buffer;
    if (PyObject_GetBuffer(args[0], &buffer, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *found = PyDict_New();
    int status = found ? DONE : FAILED;
    span s = {(const uint8_t *)buffer.buf, (const uint8_t *)buffer.buf + buffer.len}, body;
    uint32_t field;
    int wire_type;
    while (status == DONE && s.p < s.end) {
        if (!read_tag(&s, &field, &wire_type)) status = FALLBACK;
        else if (field == 1) /* repeated occurrences merge: their entries add up */
            status = wire_type == 2 && read_body(&s, &body) ? features_message(body, args[1], found) : FALLBACK;
        else if (!skip_field(&s, wire_type)) status = FALLBACK;
    }
    PyBuffer_Release(&buffer);
    if (status == DONE) return found;
    Py_XDECREF(found);
    if (status == FAILED) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"example_features", (PyCFunction)(void (*)(void))example_features, METH_FASTCALL, example_features_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_wire", "Fast tf.Example scanner for datamodules.tfrecord.features.", -1, methods,
};

PyMODINIT_FUNC PyInit__wire(void) {
    const char *names[4] = {NULL, "bytes", "float", "int64"};
    for (int i = 1; i < 4; i++)
        if (!kind_names[i] && !(kind_names[i] = PyUnicode_InternFromString(names[i]))) return NULL;
    return PyModule_Create(&module_def);
}
