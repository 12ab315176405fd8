/* otelworker._wire: OTLP protobuf read straight off the wire, for two hot paths that
 * Python can only do one attribute read per record at a time (docs/performance.md):
 *
 *   time_range(signal, data)  the earliest and latest record timestamps of a serialized
 *                             traces or logs request (what the door stages for the
 *                             manifest), as otelworker.otlp.time_range computes them;
 *   span_columns(data, render) the otel_traces table's per-span columns of a serialized
 *                             ExportTraceServiceRequest as Arrow buffers (offsets and
 *                             bytes), for otelworker/columnar/convert.py to wrap without
 *                             a Python object per value;
 *   log_columns(data, render)  the same for otel_logs and ExportLogsServiceRequest;
 *   inspect(signal, data)      a request of any signal checked as upb checks it, with its
 *                             record count, time range and service names (the door's
 *                             decode, without a message), against the schema that
 *                             configure() was given.
 *
 * Both follow the Python paths exactly or decline: anything they do not handle the one
 * way the Python path does (a singular field written twice, which protobuf merges; a
 * known field with another wire type; groups; a repeated attribute key; a malformed
 * length) makes them return False, and the caller runs the Python path, which decodes
 * with upb and raises for what is malformed. Values that need Python's rendering
 * (doubles, bytes, arrays and kvlists in attributes) are rendered by the `render`
 * callable given the AnyValue's bytes. No state; the GIL is held throughout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* --- the wire ------------------------------------------------------------------------ */

typedef struct {
    uint32_t field;
    int wt;
    uint64_t v;          /* varint, fixed64, fixed32 */
    const uint8_t *d;    /* length-delimited */
    size_t len;
} Field;

static inline int read_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out) {
    const uint8_t *p = *pp;
    uint64_t v = 0;
    if (p < end && *p < 0x80) { /* most tags and lengths: one byte */
        *out = *p;
        *pp = p + 1;
        return 1;
    }
    for (int shift = 0; shift < 64 && p < end; shift += 7) {
        uint8_t b = *p++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *pp = p;
            *out = v;
            return 1;
        }
    }
    return 0;
}

static uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* 1: a field read; 0: the end; -1: malformed or a group (decline). As upb: a tag and a
 * length take at most 5 bytes (a longer, zero-padded one is malformed), a length is below
 * INT32_MAX, a tag at most UINT32_MAX with a field number of 1 or more. */
static inline __attribute__((always_inline)) int next_field(const uint8_t **pp, const uint8_t *end, Field *f) {
    uint64_t key, n;
    const uint8_t *start = *pp;
    if (start >= end) return 0;
    if (!read_varint(pp, end, &key) || *pp - start > 5) return -1;
    f->field = (uint32_t)(key >> 3);
    f->wt = (int)(key & 7);
    if (f->field == 0 || (key >> 3) > 0x1fffffff) return -1;
    switch (f->wt) {
    case 0:
        return read_varint(pp, end, &f->v) ? 1 : -1;
    case 1:
        if (end - *pp < 8) return -1;
        f->v = le64(*pp);
        *pp += 8;
        return 1;
    case 2:
        start = *pp;
        if (!read_varint(pp, end, &n) || *pp - start > 5 || n >= INT32_MAX ||
            n > (uint64_t)(end - *pp))
            return -1;
        f->d = *pp;
        f->len = (size_t)n;
        *pp += n;
        return 1;
    case 5:
        if (end - *pp < 4) return -1;
        f->v = (uint64_t)(*pp)[0] | (uint64_t)(*pp)[1] << 8 | (uint64_t)(*pp)[2] << 16 |
               (uint64_t)(*pp)[3] << 24;
        *pp += 4;
        return 1;
    default:
        return -1;
    }
}

/* A field seen twice in one message: bit per field number below 32. */
#define ONCE(seen, n) (((seen) >> (n)) & 1u ? 0 : ((seen) |= 1u << (n), 1))

#define DECLINE (-2)
#define FAIL (-1)

/* --- time ranges ----------------------------------------------------------------------- */

typedef struct {
    uint64_t low, high;
} Range;

static int span_times(const uint8_t *p, const uint8_t *end, Range *r) {
    Field f = {0};
    int rc;
    uint32_t seen = 0;
    uint64_t start = 0, stop = 0;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field == 7 || f.field == 8) {
            if (f.wt != 1 || !ONCE(seen, f.field)) return DECLINE;
            if (f.field == 7) start = f.v; else stop = f.v;
        }
    }
    if (rc < 0) return DECLINE;
    if (!stop) stop = start;
    if (start && (!r->low || start < r->low)) r->low = start;
    if (stop > r->high) r->high = stop;
    return 0;
}

static int log_times(const uint8_t *p, const uint8_t *end, Range *r) {
    Field f = {0};
    int rc;
    uint32_t seen = 0;
    uint64_t t = 0, observed = 0;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field == 1 || f.field == 11) {
            if (f.wt != 1 || !ONCE(seen, f.field)) return DECLINE;
            if (f.field == 1) t = f.v; else observed = f.v;
        }
    }
    if (rc < 0) return DECLINE;
    if (!t) t = observed;
    if (t && (!r->low || t < r->low)) r->low = t;
    if (t > r->high) r->high = t;
    return 0;
}

typedef int (*RecordFn)(const uint8_t *, const uint8_t *, Range *);

/* Descend request(1) -> resource(2) -> scope(2) -> records; depth 0 is the request. */
static int walk(const uint8_t *p, const uint8_t *end, int depth, RecordFn record, Range *r) {
    static const uint32_t child[3] = {1, 2, 2};
    Field f = {0};
    int rc;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field != child[depth]) continue;
        if (f.wt != 2) return DECLINE;
        rc = depth == 2 ? record(f.d, f.d + f.len, r) : walk(f.d, f.d + f.len, depth + 1, record, r);
        if (rc) return rc;
    }
    return rc < 0 ? DECLINE : 0;
}

static PyObject *time_range(PyObject *self, PyObject *args) {
    const char *signal;
    Py_buffer data;
    RecordFn record;
    Range r = {0, 0};
    if (!PyArg_ParseTuple(args, "sy*", &signal, &data)) return NULL;
    if (strcmp(signal, "traces") == 0) record = span_times;
    else if (strcmp(signal, "logs") == 0) record = log_times;
    else {
        PyBuffer_Release(&data);
        Py_RETURN_FALSE;
    }
    int rc = walk((const uint8_t *)data.buf, (const uint8_t *)data.buf + data.len, 0, record, &r);
    PyBuffer_Release(&data);
    if (rc) Py_RETURN_FALSE;
    if (!r.low || !r.high) Py_RETURN_NONE;
    return Py_BuildValue("(KK)", (unsigned long long)r.low, (unsigned long long)r.high);
}

/* --- growable buffers and Arrow columns ------------------------------------------------ */

typedef struct {
    char *buf;
    size_t len, cap;
} Buf;

static int buf_reserve(Buf *b, size_t more) {
    if (b->len + more <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more) cap *= 2;
    char *grown = PyMem_Realloc(b->buf, cap);
    if (!grown) {
        PyErr_NoMemory();
        return FAIL;
    }
    b->buf = grown;
    b->cap = cap;
    return 0;
}

static int buf_put(Buf *b, const void *src, size_t n) {
    if (buf_reserve(b, n)) return FAIL;
    if (n) memcpy(b->buf + b->len, src, n);
    b->len += n;
    return 0;
}

static int put_i32(Buf *b, int32_t v) { return buf_put(b, &v, 4); }
static int put_i64(Buf *b, int64_t v) { return buf_put(b, &v, 8); }

static PyObject *buf_bytes(Buf *b) {
    return PyBytes_FromStringAndSize(b->buf ? b->buf : "", (Py_ssize_t)b->len);
}

/* A string column: int32 offsets (one per value, after the leading 0) and the bytes. */
typedef struct {
    Buf offsets, data;
} Str;

static int str_init(Str *s) { return put_i32(&s->offsets, 0); }

static int str_end(Str *s) {
    if (s->data.len > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "a string column past 2 GiB");
        return FAIL;
    }
    return put_i32(&s->offsets, (int32_t)s->data.len);
}

static int str_add(Str *s, const void *p, size_t n) {
    if (buf_put(&s->data, p, n)) return FAIL;
    return str_end(s);
}

static int str_hex(Str *s, const uint8_t *p, size_t n) {
    static const char digits[] = "0123456789abcdef";
    if (buf_reserve(&s->data, 2 * n)) return FAIL;
    char *out = s->data.buf + s->data.len;
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[p[i] >> 4];
        out[2 * i + 1] = digits[p[i] & 15];
    }
    s->data.len += 2 * n;
    return str_end(s);
}

/* A MAP<string,string> column: int32 offsets per row into keys and values. */
typedef struct {
    Buf offsets;
    Str keys, values;
    int32_t count;
} Map;

static int map_init(Map *m) {
    m->count = 0;
    if (put_i32(&m->offsets, 0) || str_init(&m->keys) || str_init(&m->values)) return FAIL;
    return 0;
}

/* The row ends: its keys since `start` must be distinct (a repeated key keeps its last
 * value in the Python path, reordered: decline rather than copy that rule). */
static int map_row(Map *m, int32_t start) {
    const int32_t *off = (const int32_t *)m->keys.offsets.buf;
    for (int32_t i = start; i < m->count; i++) {
        for (int32_t j = i + 1; j < m->count; j++) {
            int32_t li = off[i + 1] - off[i], lj = off[j + 1] - off[j];
            if (li == lj && memcmp(m->keys.data.buf + off[i], m->keys.data.buf + off[j], (size_t)li) == 0)
                return DECLINE;
        }
    }
    return put_i32(&m->offsets, m->count);
}

/* One AnyValue rendered into `out` as the Python path renders it. */
static int add_value(Str *out, const uint8_t *p, const uint8_t *end, PyObject *render) {
    Field f = {0}, which = {0};
    int rc, set = 0;
    const uint8_t *start = p;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field >= 1 && f.field <= 7) {
            static const int wire[8] = {-1, 2, 0, 0, 1, 2, 2, 2};
            if (f.wt != wire[f.field] || set) return DECLINE;
            set = 1;
            which = f;
        }
    }
    if (rc < 0) return DECLINE;
    if (!set) return str_add(out, "", 0);
    char text[32];
    switch (which.field) {
    case 1:
        return str_add(out, which.d, which.len);
    case 2:
        return which.v ? str_add(out, "true", 4) : str_add(out, "false", 5);
    case 3: {
        int n = snprintf(text, sizeof text, "%lld", (long long)(int64_t)which.v);
        return str_add(out, text, (size_t)n);
    }
    default: {
        PyObject *raw = PyBytes_FromStringAndSize((const char *)start, end - start);
        if (!raw) return FAIL;
        PyObject *rendered = PyObject_CallOneArg(render, raw);
        Py_DECREF(raw);
        if (!rendered) return FAIL;
        Py_ssize_t n;
        const char *utf8 = PyUnicode_Check(rendered) ? PyUnicode_AsUTF8AndSize(rendered, &n) : NULL;
        if (!utf8) {
            Py_DECREF(rendered);
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "render must return str");
            return FAIL;
        }
        rc = str_add(out, utf8, (size_t)n);
        Py_DECREF(rendered);
        return rc;
    }
    }
}

/* One KeyValue into a map's current row. */
static int add_pair(Map *m, const uint8_t *p, const uint8_t *end, PyObject *render) {
    Field f = {0}, key = {0}, value = {0};
    int rc;
    uint32_t seen = 0;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field == 1 || f.field == 2) {
            if (f.wt != 2 || !ONCE(seen, f.field)) return DECLINE;
            if (f.field == 1) key = f; else value = f;
        }
    }
    if (rc < 0) return DECLINE;
    if (str_add(&m->keys, key.d, key.len)) return FAIL;
    if ((rc = add_value(&m->values, value.d, value.d + value.len, render))) return rc;
    m->count++;
    return 0;
}

/* --- the otel_traces columns ----------------------------------------------------------- */

typedef struct {
    int32_t rows;
    Buf ts, duration, kind, code, resource, scope;
    Str trace_id, span_id, parent, state, name, message;
    Map attrs;
    Buf ev_offsets, ev_ts;
    Str ev_name;
    Map ev_attrs;
    int32_t events;
    Buf ln_offsets;
    Str ln_trace, ln_span, ln_state;
    Map ln_attrs;
    int32_t links;
    PyObject *resources, *scopes; /* lists of bytes: each Resource / InstrumentationScope */
    PyObject *render;
} Spans;

static int64_t clamp_u64(uint64_t v) { return v > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)v; }

static int64_t clamp_i128(__int128 v) {
    if (v > (__int128)INT64_MAX) return INT64_MAX;
    if (v < (__int128)INT64_MIN) return INT64_MIN;
    return (int64_t)v;
}

static int add_event(Spans *s, const uint8_t *p, const uint8_t *end) {
    Field f = {0}, name = {0};
    int rc;
    uint32_t seen = 0;
    uint64_t t = 0;
    int32_t start = s->ev_attrs.count;
    while ((rc = next_field(&p, end, &f)) == 1) {
        switch (f.field) {
        case 1:
            if (f.wt != 1 || !ONCE(seen, 1)) return DECLINE;
            t = f.v;
            break;
        case 2:
            if (f.wt != 2 || !ONCE(seen, 2)) return DECLINE;
            name = f;
            break;
        case 3:
            if (f.wt != 2) return DECLINE;
            if ((rc = add_pair(&s->ev_attrs, f.d, f.d + f.len, s->render))) return rc;
            break;
        case 4:
            if (f.wt != 0) return DECLINE;
            break;
        }
    }
    if (rc < 0) return DECLINE;
    if (put_i64(&s->ev_ts, clamp_u64(t)) || str_add(&s->ev_name, name.d, name.len)) return FAIL;
    if ((rc = map_row(&s->ev_attrs, start))) return rc;
    s->events++;
    return 0;
}

static int add_link(Spans *s, const uint8_t *p, const uint8_t *end) {
    Field f = {0}, trace = {0}, span = {0}, state = {0};
    int rc;
    uint32_t seen = 0;
    int32_t start = s->ln_attrs.count;
    while ((rc = next_field(&p, end, &f)) == 1) {
        switch (f.field) {
        case 1: case 2: case 3:
            if (f.wt != 2 || !ONCE(seen, f.field)) return DECLINE;
            if (f.field == 1) trace = f; else if (f.field == 2) span = f; else state = f;
            break;
        case 4:
            if (f.wt != 2) return DECLINE;
            if ((rc = add_pair(&s->ln_attrs, f.d, f.d + f.len, s->render))) return rc;
            break;
        case 5:
            if (f.wt != 0) return DECLINE;
            break;
        case 6:
            if (f.wt != 5) return DECLINE;
            break;
        }
    }
    if (rc < 0) return DECLINE;
    if (str_hex(&s->ln_trace, trace.d, trace.len) || str_hex(&s->ln_span, span.d, span.len) ||
        str_add(&s->ln_state, state.d, state.len))
        return FAIL;
    if ((rc = map_row(&s->ln_attrs, start))) return rc;
    s->links++;
    return 0;
}

static int add_status(const uint8_t *p, const uint8_t *end, Field *message, int64_t *code) {
    Field f = {0};
    int rc;
    uint32_t seen = 0;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field == 2) {
            if (f.wt != 2 || !ONCE(seen, 2)) return DECLINE;
            *message = f;
        } else if (f.field == 3) {
            if (f.wt != 0 || !ONCE(seen, 3)) return DECLINE;
            *code = (int64_t)(int32_t)(uint32_t)f.v;
        }
    }
    return rc < 0 ? DECLINE : 0;
}

/* Span fields and the wire type each must have (-1: not a field read here). */
static const int SPAN_WIRE[17] = {-1, 2, 2, 2, 2, 2, 0, 1, 1, 2, 0, 2, 0, 2, 0, 2, 5};

static int add_span(Spans *s, const uint8_t *p, const uint8_t *end, int32_t resource, int32_t scope) {
    Field f = {0}, id[6] = {{0}}, message = {0};
    int rc;
    uint32_t seen = 0;
    uint64_t start = 0, stop = 0;
    int64_t kind = 0, code = 0;
    int32_t attrs = s->attrs.count;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field > 16) continue;
        if (f.wt != SPAN_WIRE[f.field]) return DECLINE;
        switch (f.field) {
        case 1: case 2: case 3: case 4: case 5:
            if (!ONCE(seen, f.field)) return DECLINE;
            id[f.field] = f;
            break;
        case 6:
            if (!ONCE(seen, 6)) return DECLINE;
            kind = (int64_t)(int32_t)(uint32_t)f.v;
            break;
        case 7:
            if (!ONCE(seen, 7)) return DECLINE;
            start = f.v;
            break;
        case 8:
            if (!ONCE(seen, 8)) return DECLINE;
            stop = f.v;
            break;
        case 9:
            if ((rc = add_pair(&s->attrs, f.d, f.d + f.len, s->render))) return rc;
            break;
        case 11:
            if ((rc = add_event(s, f.d, f.d + f.len))) return rc;
            break;
        case 13:
            if ((rc = add_link(s, f.d, f.d + f.len))) return rc;
            break;
        case 15:
            if (!ONCE(seen, 15)) return DECLINE;
            if ((rc = add_status(f.d, f.d + f.len, &message, &code))) return rc;
            break;
        }
    }
    if (rc < 0) return DECLINE;
    if (put_i64(&s->ts, clamp_u64(start)) ||
        put_i64(&s->duration, clamp_i128((__int128)stop - (__int128)start)) ||
        put_i32(&s->kind, kind >= 0 && kind < 6 ? (int32_t)kind : 6) ||
        put_i32(&s->code, code >= 0 && code < 3 ? (int32_t)code : 3) ||
        put_i32(&s->resource, resource) || put_i32(&s->scope, scope) ||
        str_hex(&s->trace_id, id[1].d, id[1].len) || str_hex(&s->span_id, id[2].d, id[2].len) ||
        str_add(&s->state, id[3].d, id[3].len) || str_hex(&s->parent, id[4].d, id[4].len) ||
        str_add(&s->name, id[5].d, id[5].len) || str_add(&s->message, message.d, message.len) ||
        put_i32(&s->ev_offsets, s->events) || put_i32(&s->ln_offsets, s->links))
        return FAIL;
    if ((rc = map_row(&s->attrs, attrs))) return rc;
    s->rows++;
    return 0;
}

static int append_message(PyObject *list, const Field *f) {
    PyObject *raw = PyBytes_FromStringAndSize(f->d ? (const char *)f->d : "", (Py_ssize_t)f->len);
    if (!raw) return FAIL;
    int rc = PyList_Append(list, raw);
    Py_DECREF(raw);
    return rc ? FAIL : 0;
}

static int add_scope_spans(Spans *s, const uint8_t *p, const uint8_t *end, int32_t resource) {
    Field f = {0}, scope = {0};
    int rc;
    uint32_t seen = 0;
    int32_t index = (int32_t)PyList_GET_SIZE(s->scopes);
    /* Hold the scope's place: its bytes are set once the whole ScopeSpans is read. */
    if (PyList_Append(s->scopes, Py_None)) return FAIL;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field == 1) {
            if (f.wt != 2 || !ONCE(seen, 1)) return DECLINE;
            scope = f;
        } else if (f.field == 2) {
            if (f.wt != 2) return DECLINE;
            if ((rc = add_span(s, f.d, f.d + f.len, resource, index))) return rc;
        } else if (f.field == 3 && f.wt != 2) {
            return DECLINE;
        }
    }
    if (rc < 0) return DECLINE;
    PyObject *raw = PyBytes_FromStringAndSize(scope.d ? (const char *)scope.d : "", (Py_ssize_t)scope.len);
    if (!raw) return FAIL;
    return PyList_SetItem(s->scopes, index, raw) ? FAIL : 0; /* steals raw */
}

static int add_resource_spans(Spans *s, const uint8_t *p, const uint8_t *end) {
    Field f = {0}, resource = {0};
    int rc;
    uint32_t seen = 0;
    int32_t index = (int32_t)PyList_GET_SIZE(s->resources);
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field == 1) {
            if (f.wt != 2 || !ONCE(seen, 1)) return DECLINE;
            resource = f;
        } else if (f.field == 2) {
            if (f.wt != 2) return DECLINE;
            if ((rc = add_scope_spans(s, f.d, f.d + f.len, index))) return rc;
        } else if (f.field == 3 && f.wt != 2) {
            return DECLINE;
        }
    }
    if (rc < 0) return DECLINE;
    return append_message(s->resources, &resource);
}

static void map_free(Map *m) {
    PyMem_Free(m->offsets.buf);
    PyMem_Free(m->keys.offsets.buf);
    PyMem_Free(m->keys.data.buf);
    PyMem_Free(m->values.offsets.buf);
    PyMem_Free(m->values.data.buf);
}

static void str_free(Str *s) {
    PyMem_Free(s->offsets.buf);
    PyMem_Free(s->data.buf);
}

static void spans_free(Spans *s) {
    Buf *bufs[] = {&s->ts, &s->duration, &s->kind, &s->code, &s->resource, &s->scope,
                   &s->ev_offsets, &s->ev_ts, &s->ln_offsets};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) PyMem_Free(bufs[i]->buf);
    Str *strs[] = {&s->trace_id, &s->span_id, &s->parent, &s->state, &s->name, &s->message,
                   &s->ev_name, &s->ln_trace, &s->ln_span, &s->ln_state};
    for (size_t i = 0; i < sizeof strs / sizeof *strs; i++) str_free(strs[i]);
    map_free(&s->attrs);
    map_free(&s->ev_attrs);
    map_free(&s->ln_attrs);
    Py_XDECREF(s->resources);
    Py_XDECREF(s->scopes);
}

static PyObject *str_tuple(Str *s) {
    PyObject *o = buf_bytes(&s->offsets), *d = buf_bytes(&s->data);
    if (!o || !d) {
        Py_XDECREF(o);
        Py_XDECREF(d);
        return NULL;
    }
    return Py_BuildValue("(NN)", o, d);
}

static PyObject *map_tuple(Map *m) {
    PyObject *o = buf_bytes(&m->offsets), *k = str_tuple(&m->keys), *v = str_tuple(&m->values);
    if (!o || !k || !v) {
        Py_XDECREF(o);
        Py_XDECREF(k);
        Py_XDECREF(v);
        return NULL;
    }
    return Py_BuildValue("(NNN)", o, k, v);
}

static PyObject *span_columns(PyObject *self, PyObject *args) {
    Py_buffer data;
    PyObject *render;
    Spans s;
    memset(&s, 0, sizeof s);
    if (!PyArg_ParseTuple(args, "y*O", &data, &render)) return NULL;
    s.render = render;
    s.resources = PyList_New(0);
    s.scopes = PyList_New(0);
    int rc = (!s.resources || !s.scopes) ? FAIL : 0;
    Str *strs[] = {&s.trace_id, &s.span_id, &s.parent, &s.state, &s.name, &s.message,
                   &s.ev_name, &s.ln_trace, &s.ln_span, &s.ln_state};
    for (size_t i = 0; !rc && i < sizeof strs / sizeof *strs; i++) rc = str_init(strs[i]);
    if (!rc) rc = map_init(&s.attrs) || map_init(&s.ev_attrs) || map_init(&s.ln_attrs) ||
                  put_i32(&s.ev_offsets, 0) || put_i32(&s.ln_offsets, 0) ? FAIL : 0;
    const uint8_t *p = (const uint8_t *)data.buf, *end = p + data.len;
    Field f = {0};
    while (!rc && (rc = next_field(&p, end, &f)) == 1) {
        rc = 0;
        if (f.field != 1) continue;
        if (f.wt != 2) rc = DECLINE;
        else rc = add_resource_spans(&s, f.d, f.d + f.len);
    }
    if (rc == -1 && !PyErr_Occurred()) rc = DECLINE; /* next_field's -1: malformed */
    PyBuffer_Release(&data);
    PyObject *result = NULL;
    if (rc == DECLINE) {
        result = Py_False;
        Py_INCREF(result);
    } else if (rc == 0) {
        result = Py_BuildValue(
            "{s:i,s:N,s:N,s:N,s:N,s:N,s:N,s:O,s:O,s:N,s:N,s:N,s:N,s:N,s:N,s:N,"
            "s:N,s:N,s:N,s:N,s:N,s:N,s:N,s:N,s:N}",
            "rows", s.rows,
            "ts", buf_bytes(&s.ts), "duration", buf_bytes(&s.duration),
            "kind", buf_bytes(&s.kind), "code", buf_bytes(&s.code),
            "resource", buf_bytes(&s.resource), "scope", buf_bytes(&s.scope),
            "resources", s.resources, "scopes", s.scopes,
            "trace_id", str_tuple(&s.trace_id), "span_id", str_tuple(&s.span_id),
            "parent", str_tuple(&s.parent), "state", str_tuple(&s.state),
            "name", str_tuple(&s.name), "message", str_tuple(&s.message),
            "attrs", map_tuple(&s.attrs),
            "ev_offsets", buf_bytes(&s.ev_offsets), "ev_ts", buf_bytes(&s.ev_ts),
            "ev_name", str_tuple(&s.ev_name), "ev_attrs", map_tuple(&s.ev_attrs),
            "ln_offsets", buf_bytes(&s.ln_offsets), "ln_trace", str_tuple(&s.ln_trace),
            "ln_span", str_tuple(&s.ln_span), "ln_state", str_tuple(&s.ln_state),
            "ln_attrs", map_tuple(&s.ln_attrs));
    }
    spans_free(&s);
    return result;
}

/* --- the otel_logs columns ------------------------------------------------------------ */

typedef struct {
    int32_t rows;
    Buf ts, flags, severity, resource, scope;
    Str trace_id, span_id, severity_text, body;
    Map attrs;
    /* per resource and per scope: the message's bytes and the schema URL's */
    PyObject *resources, *resource_urls, *scopes, *scope_urls;
    PyObject *render;
} Logs;

/* LogRecord fields and the wire type each must have (-1: not a field read here). */
static const int LOG_WIRE[13] = {-1, 1, 0, 2, -1, 2, 2, 0, 5, 2, 2, 1, 2};

static int add_log(Logs *s, const uint8_t *p, const uint8_t *end, int32_t resource, int32_t scope) {
    Field f = {0}, text = {0}, body = {0}, trace = {0}, span = {0};
    int rc;
    uint32_t seen = 0;
    uint64_t t = 0, observed = 0, flags = 0;
    int64_t severity = 0;
    int32_t attrs = s->attrs.count;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field > 12) continue;
        if (LOG_WIRE[f.field] < 0) {
            if (f.field == 4) return DECLINE; /* reserved in the proto: never written */
            continue;
        }
        if (f.wt != LOG_WIRE[f.field]) return DECLINE;
        if (f.field != 6 && !ONCE(seen, f.field)) return DECLINE;
        switch (f.field) {
        case 1: t = f.v; break;
        case 2: severity = (int64_t)(int32_t)(uint32_t)f.v; break;
        case 3: text = f; break;
        case 5: body = f; break;
        case 6:
            if ((rc = add_pair(&s->attrs, f.d, f.d + f.len, s->render))) return rc;
            break;
        case 8: flags = f.v; break;
        case 9: trace = f; break;
        case 10: span = f; break;
        case 11: observed = f.v; break;
        }
    }
    if (rc < 0) return DECLINE;
    uint8_t flag = (uint8_t)(flags & 0xff), sev = (uint8_t)(severity & 0xff);
    if (put_i64(&s->ts, clamp_u64(t ? t : observed)) || buf_put(&s->flags, &flag, 1) ||
        buf_put(&s->severity, &sev, 1) || put_i32(&s->resource, resource) ||
        put_i32(&s->scope, scope) || str_hex(&s->trace_id, trace.d, trace.len) ||
        str_hex(&s->span_id, span.d, span.len) || str_add(&s->severity_text, text.d, text.len))
        return FAIL;
    if ((rc = add_value(&s->body, body.d, body.d + body.len, s->render))) return rc;
    if ((rc = map_row(&s->attrs, attrs))) return rc;
    s->rows++;
    return 0;
}

/* A message's field 1 (its resource or scope) and field 3 (its schema URL), appended to
 * `messages` and `urls` once the whole message is read; records (field 2) by `record`. */
static int add_scope_logs(Logs *s, const uint8_t *p, const uint8_t *end, int32_t resource) {
    Field f = {0}, scope = {0}, url = {0};
    int rc;
    uint32_t seen = 0;
    int32_t index = (int32_t)PyList_GET_SIZE(s->scopes);
    if (PyList_Append(s->scopes, Py_None) || PyList_Append(s->scope_urls, Py_None)) return FAIL;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field < 1 || f.field > 3) continue;
        if (f.wt != 2) return DECLINE;
        if (f.field == 2) {
            if ((rc = add_log(s, f.d, f.d + f.len, resource, index))) return rc;
            continue;
        }
        if (!ONCE(seen, f.field)) return DECLINE;
        if (f.field == 1) scope = f; else url = f;
    }
    if (rc < 0) return DECLINE;
    PyObject *a = PyBytes_FromStringAndSize(scope.d ? (const char *)scope.d : "", (Py_ssize_t)scope.len);
    if (!a || PyList_SetItem(s->scopes, index, a)) return FAIL;
    PyObject *b = PyBytes_FromStringAndSize(url.d ? (const char *)url.d : "", (Py_ssize_t)url.len);
    if (!b || PyList_SetItem(s->scope_urls, index, b)) return FAIL;
    return 0;
}

static int add_resource_logs(Logs *s, const uint8_t *p, const uint8_t *end) {
    Field f = {0}, resource = {0}, url = {0};
    int rc;
    uint32_t seen = 0;
    int32_t index = (int32_t)PyList_GET_SIZE(s->resources);
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field < 1 || f.field > 3) continue;
        if (f.wt != 2) return DECLINE;
        if (f.field == 2) {
            if ((rc = add_scope_logs(s, f.d, f.d + f.len, index))) return rc;
            continue;
        }
        if (!ONCE(seen, f.field)) return DECLINE;
        if (f.field == 1) resource = f; else url = f;
    }
    if (rc < 0) return DECLINE;
    if (append_message(s->resources, &resource)) return FAIL;
    return append_message(s->resource_urls, &url);
}

static void logs_free(Logs *s) {
    Buf *bufs[] = {&s->ts, &s->flags, &s->severity, &s->resource, &s->scope};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) PyMem_Free(bufs[i]->buf);
    Str *strs[] = {&s->trace_id, &s->span_id, &s->severity_text, &s->body};
    for (size_t i = 0; i < sizeof strs / sizeof *strs; i++) str_free(strs[i]);
    map_free(&s->attrs);
    Py_XDECREF(s->resources);
    Py_XDECREF(s->resource_urls);
    Py_XDECREF(s->scopes);
    Py_XDECREF(s->scope_urls);
}

static PyObject *log_columns(PyObject *self, PyObject *args) {
    Py_buffer data;
    PyObject *render;
    Logs s;
    memset(&s, 0, sizeof s);
    if (!PyArg_ParseTuple(args, "y*O", &data, &render)) return NULL;
    s.render = render;
    s.resources = PyList_New(0);
    s.resource_urls = PyList_New(0);
    s.scopes = PyList_New(0);
    s.scope_urls = PyList_New(0);
    int rc = (!s.resources || !s.resource_urls || !s.scopes || !s.scope_urls) ? FAIL : 0;
    if (!rc) rc = str_init(&s.trace_id) || str_init(&s.span_id) || str_init(&s.severity_text) ||
                  str_init(&s.body) || map_init(&s.attrs) ? FAIL : 0;
    const uint8_t *p = (const uint8_t *)data.buf, *end = p + data.len;
    Field f = {0};
    while (!rc && (rc = next_field(&p, end, &f)) == 1) {
        rc = 0;
        if (f.field != 1) continue;
        if (f.wt != 2) rc = DECLINE;
        else rc = add_resource_logs(&s, f.d, f.d + f.len);
    }
    if (rc == -1 && !PyErr_Occurred()) rc = DECLINE;
    PyBuffer_Release(&data);
    PyObject *result = NULL;
    if (rc == DECLINE) {
        result = Py_False;
        Py_INCREF(result);
    } else if (rc == 0) {
        result = Py_BuildValue(
            "{s:i,s:N,s:N,s:N,s:N,s:N,s:O,s:O,s:O,s:O,s:N,s:N,s:N,s:N,s:N}",
            "rows", s.rows,
            "ts", buf_bytes(&s.ts), "flags", buf_bytes(&s.flags),
            "severity", buf_bytes(&s.severity),
            "resource", buf_bytes(&s.resource), "scope", buf_bytes(&s.scope),
            "resources", s.resources, "resource_urls", s.resource_urls,
            "scopes", s.scopes, "scope_urls", s.scope_urls,
            "trace_id", str_tuple(&s.trace_id), "span_id", str_tuple(&s.span_id),
            "severity_text", str_tuple(&s.severity_text), "body", str_tuple(&s.body),
            "attrs", map_tuple(&s.attrs));
    }
    logs_free(&s);
    return result;
}

/* --- inspect: the door's check and facts in one pass -------------------------------- */

/* What the door needs of a request: that upb would parse it, and its record count, record
 * time range and resource service names. upb's decode makes a message of it only for the
 * door to read those three back (31 us of a 25 KB 100-span request, 208 of a 129 KB
 * 512-span one); this reads the bytes once, checking what upb checks, against a schema
 * built from the installed protobuf descriptors (configure(), otelworker/wire.py), so
 * the fields it knows are the ones upb knows.
 *
 * What upb checks and this does too: the wire (tags, varints, lengths, wire types 0-5),
 * strict UTF-8 in every string field (proto3), packed repeated scalars, the nesting.
 * Unknown fields are skipped as upb keeps them, unread. Whatever it is not certain upb
 * reads as it does - a known field with another wire type (upb keeps that as unknown),
 * groups, nesting past MAX_INSPECT_DEPTH (upb's limit is 100), anything malformed, a
 * fact's field written twice (protobuf merges or keeps the last), two members of
 * Metric's data oneof - makes it decline (False): the caller then decodes with upb,
 * which accepts it or names what is wrong. It never refuses a request itself. */

enum { K_NONE, K_VARINT, K_FIXED64, K_FIXED32, K_STRING, K_BYTES, K_MESSAGE };
enum { R_NONE, R_SPAN, R_LOG, R_POINT, R_RESOURCE, R_METRIC };
#define MAX_INSPECT_DEPTH 64

typedef struct {
    uint8_t kind, repeated, wt; /* wt: the kind's wire type */
    int32_t child;
} FSpec;

typedef struct {
    int role;
    uint32_t a, b;       /* the role's fields: the two times, or Resource.attributes */
    uint64_t oneof;      /* R_METRIC: the data oneof's members, a bit per field number */
    uint32_t max;
    FSpec *fields;       /* indexed by field number, 0..max */
} MSpec;

static MSpec *specs = NULL;
static Py_ssize_t nspecs = 0;
static long roots[3] = {-1, -1, -1}; /* traces, metrics, logs */

typedef struct {
    uint64_t records;
    Range r;
    PyObject *names;
} Facts;

static int utf8_ok(const uint8_t *s, size_t n) {
    const uint8_t *end = s + n;
    while (s < end) {
        while (end - s >= 8) {
            uint64_t w;
            memcpy(&w, s, 8);
            if (w & 0x8080808080808080ULL) break;
            s += 8;
        }
        if (s >= end) break;
        uint8_t c = *s;
        if (c < 0x80) {
            s++;
        } else if (c < 0xC2) {
            return 0;
        } else if (c < 0xE0) {
            if (end - s < 2 || (s[1] & 0xC0) != 0x80) return 0;
            s += 2;
        } else if (c < 0xF0) {
            if (end - s < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
            if ((c == 0xE0 && s[1] < 0xA0) || (c == 0xED && s[1] > 0x9F)) return 0;
            s += 3;
        } else if (c < 0xF5) {
            if (end - s < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 ||
                (s[3] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xF0 && s[1] < 0x90) || (c == 0xF4 && s[1] > 0x8F)) return 0;
            s += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

static int packed_varints(const uint8_t *p, size_t n) {
    const uint8_t *end = p + n;
    uint64_t v;
    while (p < end)
        if (!read_varint(&p, end, &v)) return 0;
    return 1;
}

/* A resource attribute (a checked KeyValue): its string value if its key is service.name. */
static int resource_name(const uint8_t *p, const uint8_t *end, Facts *fx) {
    static const char KEY[] = "service.name";
    Field f = {0};
    int rc;
    uint32_t seen = 0;
    const uint8_t *key = NULL, *value = NULL;
    size_t key_len = 0, value_len = 0;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field != 1 && f.field != 2) continue;
        if (!ONCE(seen, f.field)) return DECLINE;
        if (f.field == 1) key = f.d, key_len = f.len;
        else value = f.d, value_len = f.len;
    }
    if (rc < 0) return DECLINE;
    if (!key || key_len != sizeof KEY - 1 || memcmp(key, KEY, key_len) || !value) return 0;
    /* AnyValue: the oneof's members are its fields 1-7; set twice, protobuf keeps the last. */
    const uint8_t *q = value, *qend = value + value_len, *text = NULL;
    size_t text_len = 0;
    int members = 0;
    while ((rc = next_field(&q, qend, &f)) == 1) {
        if (f.field < 1 || f.field > 7) continue;
        if (++members > 1) return DECLINE;
        if (f.field == 1) text = f.d, text_len = f.len;
    }
    if (rc < 0) return DECLINE;
    if (!text) return 0;
    PyObject *name = PyUnicode_DecodeUTF8((const char *)text, (Py_ssize_t)text_len, NULL);
    if (!name) return FAIL;
    rc = PyList_Append(fx->names, name);
    Py_DECREF(name);
    return rc ? FAIL : 0;
}

static int inspect_message(long mi, const uint8_t *p, const uint8_t *end, int depth, Facts *fx) {
    const MSpec *m = &specs[mi];
    Field f = {0};
    int rc;
    uint32_t seen = 0;
    uint64_t oneof = 0, a = 0, b = 0;
    if (depth > MAX_INSPECT_DEPTH) return DECLINE;
    while ((rc = next_field(&p, end, &f)) == 1) {
        if (f.field > m->max) continue;
        const FSpec *s = &m->fields[f.field];
        if (s->kind == K_NONE) continue;
        if (f.wt != s->wt) {
            /* Only a packed repeated scalar comes with another wire type. */
            if (f.wt != 2 || !s->repeated || s->wt == 2) return DECLINE;
            if (s->wt == 0 ? !packed_varints(f.d, f.len) : f.len % (s->wt == 1 ? 8 : 4))
                return DECLINE;
        } else if (s->kind == K_MESSAGE) {
            rc = inspect_message(s->child, f.d, f.d + f.len, depth + 1, fx);
            if (rc) return rc;
        } else if (s->kind == K_STRING && !utf8_ok(f.d, f.len)) {
            return DECLINE;
        }
        if (m->role == R_NONE) continue;
        if (m->role == R_RESOURCE) {
            if (f.field == m->a && (rc = resource_name(f.d, f.d + f.len, fx))) return rc;
        } else if (m->role == R_METRIC) {
            if (f.field < 64 && (m->oneof >> f.field) & 1u) {
                oneof |= 1ull << f.field;
                if (oneof & (oneof - 1)) return DECLINE; /* two members: the last wins */
            }
        } else if (f.field == m->a || f.field == m->b) {
            if (!ONCE(seen, f.field)) return DECLINE;
            if (f.field == m->a) a = f.v; else b = f.v;
        }
    }
    if (rc < 0) return DECLINE;
    uint64_t low, high;
    switch (m->role) {
    case R_SPAN: /* start, end (or start) */
        low = a, high = b ? b : a;
        break;
    case R_LOG: /* time, else observed time */
        low = high = a ? a : b;
        break;
    case R_POINT:
        low = high = a;
        break;
    default:
        return 0;
    }
    fx->records++;
    if (low && (!fx->r.low || low < fx->r.low)) fx->r.low = low;
    if (high > fx->r.high) fx->r.high = high;
    return 0;
}

static void specs_free(void) {
    for (Py_ssize_t i = 0; i < nspecs; i++) PyMem_Free(specs[i].fields);
    PyMem_Free(specs);
    specs = NULL;
    nspecs = 0;
    roots[0] = roots[1] = roots[2] = -1;
}

/* configure(messages, roots): messages a list of (role, a, b, oneof, fields), fields a
 * list of (number, kind, repeated, child index); roots the request messages' indexes. */
static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *messages;
    long t, mt, l;
    if (!PyArg_ParseTuple(args, "O!(lll)", &PyList_Type, &messages, &t, &mt, &l)) return NULL;
    specs_free();
    Py_ssize_t n = PyList_GET_SIZE(messages);
    specs = PyMem_Calloc((size_t)(n ? n : 1), sizeof(MSpec));
    if (!specs) return PyErr_NoMemory();
    nspecs = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        MSpec *m = &specs[i];
        PyObject *fields;
        unsigned long long oneof;
        unsigned int a, b;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(messages, i), "iIIKO!", &m->role, &a, &b, &oneof,
                              &PyList_Type, &fields))
            goto bad;
        m->a = a, m->b = b, m->oneof = oneof;
        uint32_t max = 0;
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(fields); j++) {
            unsigned int number;
            int kind, repeated;
            long child;
            if (!PyArg_ParseTuple(PyList_GET_ITEM(fields, j), "Iiil", &number, &kind, &repeated,
                                  &child))
                goto bad;
            if (number > max) max = number;
        }
        if (max > 4096) {
            PyErr_SetString(PyExc_ValueError, "field numbers above 4096 are not supported");
            goto bad;
        }
        m->max = max;
        m->fields = PyMem_Calloc(max + 1, sizeof(FSpec));
        if (!m->fields) {
            PyErr_NoMemory();
            goto bad;
        }
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(fields); j++) {
            unsigned int number;
            int kind, repeated;
            long child;
            PyArg_ParseTuple(PyList_GET_ITEM(fields, j), "Iiil", &number, &kind, &repeated, &child);
            if (kind < K_NONE || kind > K_MESSAGE || (kind == K_MESSAGE && (child < 0 || child >= n))) {
                PyErr_SetString(PyExc_ValueError, "a field of an unknown kind or message");
                goto bad;
            }
            static const uint8_t WIRE[] = {0, 0, 1, 5, 2, 2, 2};
            m->fields[number] = (FSpec){(uint8_t)kind, (uint8_t)(repeated != 0), WIRE[kind],
                                        (int32_t)child};
        }
    }
    if (t < 0 || t >= n || mt < 0 || mt >= n || l < 0 || l >= n) {
        PyErr_SetString(PyExc_ValueError, "a root outside the messages");
        goto bad;
    }
    roots[0] = t, roots[1] = mt, roots[2] = l;
    Py_RETURN_NONE;
bad:
    specs_free();
    return NULL;
}

static PyObject *inspect(PyObject *self, PyObject *args) {
    const char *signal;
    Py_buffer data;
    long root;
    if (!PyArg_ParseTuple(args, "sy*", &signal, &data)) return NULL;
    if (strcmp(signal, "traces") == 0) root = roots[0];
    else if (strcmp(signal, "metrics") == 0) root = roots[1];
    else if (strcmp(signal, "logs") == 0) root = roots[2];
    else root = -1;
    if (root < 0) {
        PyBuffer_Release(&data);
        Py_RETURN_FALSE;
    }
    Facts fx = {0, {0, 0}, PyList_New(0)};
    if (!fx.names) {
        PyBuffer_Release(&data);
        return NULL;
    }
    const uint8_t *p = (const uint8_t *)data.buf;
    int rc = inspect_message(root, p, p + data.len, 0, &fx);
    PyBuffer_Release(&data);
    if (rc == FAIL) {
        Py_DECREF(fx.names);
        return NULL;
    }
    if (rc) {
        Py_DECREF(fx.names);
        Py_RETURN_FALSE;
    }
    PyObject *span = (fx.r.low && fx.r.high)
                         ? Py_BuildValue("(KK)", (unsigned long long)fx.r.low,
                                         (unsigned long long)fx.r.high)
                         : (Py_INCREF(Py_None), Py_None);
    if (!span) {
        Py_DECREF(fx.names);
        return NULL;
    }
    return Py_BuildValue("(KNN)", (unsigned long long)fx.records, span, fx.names);
}

static PyMethodDef methods[] = {
    {"time_range", time_range, METH_VARARGS,
     "time_range(signal, data) -> (low, high) | None | False: a traces or logs request's"
     " record time range off the wire; False: not read here (use the Python path)."},
    {"configure", configure, METH_VARARGS,
     "configure(messages, roots): the schema inspect() checks against (otelworker/wire.py"
     " builds it from the installed descriptors)."},
    {"inspect", inspect, METH_VARARGS,
     "inspect(signal, data) -> (records, (low, high) | None, [service names]) | False:"
     " a request checked as upb checks it, and the door's facts; False: not read here"
     " (decode with upb, which accepts it or says what is wrong)."},
    {"span_columns", span_columns, METH_VARARGS,
     "span_columns(data, render) -> dict | False: the otel_traces columns of a serialized"
     " ExportTraceServiceRequest as buffers; False: not read here (use the Python path)."},
    {"log_columns", log_columns, METH_VARARGS,
     "log_columns(data, render) -> dict | False: the otel_logs columns of a serialized"
     " ExportLogsServiceRequest as buffers; False: not read here (use the Python path)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wire", NULL, -1, methods};

PyMODINIT_FUNC PyInit__wire(void) { return PyModule_Create(&module); }
