/* Decode export lines straight into Arrow column buffers: the parser's fast path (parse.py, docs/PARSE_DESIGN.md).
 *
 * A Parser knows the export's top-level keys and each one's kind. parse(segments) turns lines into one
 * (null_count, validity, buffer, buffer) tuple per column and one more for `_extra`. It handles the variation
 * real exports have, per value: a value that does not fit its column (a string where a number is expected, a
 * number too large, a timestamp written another way) and a key the schema does not know go to `_extra` verbatim,
 * exactly as the msgspec path (parse._slow) keeps them. Only a line it cannot take as a whole is handed back, by
 * itself, for the msgspec path to decide (reject it, or keep it): invalid UTF-8 or JSON, not an object, an
 * escaped or repeated key, nesting deeper than MAX_DEPTH, no string uuid when one is required. Its rows must
 * equal the msgspec path's row for row (tests/test_fastparse.py checks both paths against each other on every
 * awkward value and on mutated lines; tests/test_fuzz_sanitizers.py runs it under ASan and UBSan).
 * The GIL is released while parsing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <locale.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

enum { K_STRING = 's', K_INT = 'i', K_FLOAT = 'f', K_BOOL = 'b', K_TIME = 't', K_JSON = 'j' };

#define MAX_COLUMNS 256
#define MAX_DEPTH 64 /* a value nested past MAX_DEPTH + 1 levels sends its line to the slow path */
#define HASH_SIZE 512

typedef struct {
    char *data;
    size_t len, cap;
} Buf;

static int buf_reserve(Buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    char *data = realloc(b->data, cap);
    if (!data) return -1;
    b->data = data;
    b->cap = cap;
    return 0;
}

typedef struct {
    char kind;
    uint8_t *validity; /* one bit per row */
    int64_t nulls;
    int32_t *offsets; /* strings and JSON: rows + 1 */
    Buf data;         /* strings and JSON: the bytes */
    int64_t *ints;    /* integers and timestamps (microseconds since the epoch, UTC) */
    double *floats;
    uint8_t *bools; /* one bit per row */
} Column;

typedef struct {
    PyObject_HEAD
    int ncols;
    char kinds[MAX_COLUMNS];
    char *keys[MAX_COLUMNS];
    Py_ssize_t key_lens[MAX_COLUMNS];
    int16_t table[HASH_SIZE]; /* open addressing: column index + 1, 0 = empty */
    int uuid_col;
} Parser;

static unsigned key_hash(const char *s, Py_ssize_t n) {
    unsigned h = 2166136261u;
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static int lookup(const Parser *self, const char *s, Py_ssize_t n, int guess) {
    if (guess < self->ncols && self->key_lens[guess] == n && memcmp(self->keys[guess], s, n) == 0) return guess;
    unsigned slot = key_hash(s, n) % HASH_SIZE;
    while (self->table[slot]) {
        int col = self->table[slot] - 1;
        if (self->key_lens[col] == n && memcmp(self->keys[col], s, n) == 0) return col;
        slot = (slot + 1) % HASH_SIZE;
    }
    return -1;
}

/* ---------------------------------------------------------------------------------------------- scanning */

static inline const char *skip_ws(const char *p, const char *end) {
    if (p < end && (uint8_t)*p > ' ') return p; /* the usual case: no whitespace at all */
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')) p++;
    return p;
}

static inline int is_digit(char c) { return c >= '0' && c <= '9'; }

static inline int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* 1 for bytes that end a plain run inside a JSON string: the quote, the backslash, control characters */
static uint8_t string_stop[256];

static void init_tables(void) {
    for (int c = 0; c < 256; c++) string_stop[c] = (c < 0x20 || c == '"' || c == '\\');
}

#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* The first byte at or after p that ends a plain run of string bytes (quote, backslash, control), or end. */
static inline const char *plain_run(const char *p, const char *end) {
#ifdef __SSE2__
    const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\'), space = _mm_set1_epi8(0x1F);
    while (end - p >= 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)p);
        __m128i stop = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, quote), _mm_cmpeq_epi8(x, backslash)),
                                    _mm_cmpeq_epi8(_mm_max_epu8(x, space), space)); /* x <= 0x1F */
        int mask = _mm_movemask_epi8(stop);
        if (mask) return p + __builtin_ctz(mask);
        p += 16;
    }
#endif
    while (p < end && !string_stop[(uint8_t)*p]) p++;
    return p;
}

/* The end of a JSON number token starting at p, or NULL if it is not one; *integral says no fraction, no exponent. */
static const char *scan_number(const char *p, const char *end, int *integral) {
    const char *q = p;
    *integral = 1;
    if (q < end && *q == '-') q++;
    if (q >= end) return NULL;
    if (*q == '0') {
        q++;
    } else if (*q >= '1' && *q <= '9') {
        while (q < end && is_digit(*q)) q++;
    } else {
        return NULL;
    }
    if (q < end && *q == '.') {
        *integral = 0;
        q++;
        if (q >= end || !is_digit(*q)) return NULL;
        while (q < end && is_digit(*q)) q++;
    }
    if (q < end && (*q == 'e' || *q == 'E')) {
        *integral = 0;
        q++;
        if (q < end && (*q == '+' || *q == '-')) q++;
        if (q >= end || !is_digit(*q)) return NULL;
        while (q < end && is_digit(*q)) q++;
    }
    return q;
}

/* Validate a JSON string whose opening quote is at p[-1]; return the position after its closing quote, or NULL.
 * Lone or misordered UTF-16 surrogate escapes are refused (the msgspec path decides what to do with them). */
static const char *skip_string(const char *p, const char *end) {
    for (;;) {
        p = plain_run(p, end);
        if (p >= end) return NULL;
        if (*p == '"') return p + 1;
        if (*p != '\\') return NULL; /* a raw control character */
        p++;
        if (p >= end) return NULL;
        switch (*p) {
        case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
            p++;
            break;
        case 'u': {
            if (end - p < 5) return NULL;
            unsigned cp = 0;
            for (int i = 1; i <= 4; i++) {
                int h = hex_value(p[i]);
                if (h < 0) return NULL;
                cp = cp * 16 + h;
            }
            p += 5;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return NULL;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (end - p < 6 || p[0] != '\\' || p[1] != 'u') return NULL;
                unsigned lo = 0;
                for (int i = 2; i <= 5; i++) {
                    int h = hex_value(p[i]);
                    if (h < 0) return NULL;
                    lo = lo * 16 + h;
                }
                if (lo < 0xDC00 || lo > 0xDFFF) return NULL;
                p += 6;
            }
            break;
        }
        default:
            return NULL;
        }
    }
}

static const char *skip_value(const char *p, const char *end, int depth);

static const char *skip_container(const char *p, const char *end, int depth, char close) {
    /* p is just after the opening bracket */
    if (depth > MAX_DEPTH) return NULL;
    p = skip_ws(p, end);
    if (p < end && *p == close) return p + 1;
    for (;;) {
        if (close == '}') {
            if (p >= end || *p != '"') return NULL;
            p = skip_string(p + 1, end);
            if (!p) return NULL;
            p = skip_ws(p, end);
            if (p >= end || *p != ':') return NULL;
            p = skip_ws(p + 1, end);
        }
        p = skip_value(p, end, depth + 1);
        if (!p) return NULL;
        p = skip_ws(p, end);
        if (p >= end) return NULL;
        if (*p == close) return p + 1;
        if (*p != ',') return NULL;
        p = skip_ws(p + 1, end);
    }
}

static const char *skip_value(const char *p, const char *end, int depth) {
    if (p >= end) return NULL;
    int integral;
    switch (*p) {
    case '"': return skip_string(p + 1, end);
    case '{': return skip_container(p + 1, end, depth, '}');
    case '[': return skip_container(p + 1, end, depth, ']');
    case 't': return (end - p >= 4 && memcmp(p, "true", 4) == 0) ? p + 4 : NULL;
    case 'f': return (end - p >= 5 && memcmp(p, "false", 5) == 0) ? p + 5 : NULL;
    case 'n': return (end - p >= 4 && memcmp(p, "null", 4) == 0) ? p + 4 : NULL;
    default: return scan_number(p, end, &integral);
    }
}

static inline int is_null(const char *p, const char *end) { return end - p >= 4 && memcmp(p, "null", 4) == 0; }

/* ---------------------------------------------------------------------------------------------- values */

static inline void put_utf8(char *out, size_t *n, unsigned cp) {
    if (cp < 0x80) {
        out[(*n)++] = (char)cp;
    } else if (cp < 0x800) {
        out[(*n)++] = (char)(0xC0 | (cp >> 6));
        out[(*n)++] = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out[(*n)++] = (char)(0xE0 | (cp >> 12));
        out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*n)++] = (char)(0x80 | (cp & 0x3F));
    } else {
        out[(*n)++] = (char)(0xF0 | (cp >> 18));
        out[(*n)++] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*n)++] = (char)(0x80 | (cp & 0x3F));
    }
}

/* Decode the string whose opening quote is at p[-1] onto the column's data; the position after it, or NULL.
 * One pass: plain runs are copied 16 bytes at a time (the buffer has room for the rest of the line and 16). */
static const char *read_string(const char *p, const char *end, Buf *out) {
    if (buf_reserve(out, (size_t)(end - p) + 16)) return NULL; /* decoding never lengthens a string */
    char *dst = out->data;
    size_t n = out->len;
    for (;;) {
#ifdef __SSE2__
        const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\'), space = _mm_set1_epi8(0x1F);
        int mask = 0;
        while (end - p >= 16) {
            __m128i x = _mm_loadu_si128((const __m128i *)p);
            _mm_storeu_si128((__m128i *)(dst + n), x);
            __m128i stop = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, quote), _mm_cmpeq_epi8(x, backslash)),
                                        _mm_cmpeq_epi8(_mm_max_epu8(x, space), space));
            mask = _mm_movemask_epi8(stop);
            if (mask) break;
            p += 16;
            n += 16;
        }
        if (mask) {
            int k = __builtin_ctz(mask);
            p += k;
            n += k;
        } else
#endif
        {
            while (p < end && !string_stop[(uint8_t)*p]) dst[n++] = *p++;
        }
        if (p >= end) return NULL;
        if (*p == '"') break;
        if (*p != '\\') return NULL; /* a raw control character */
        if (end - p < 2) return NULL;
        p++;
        char c = *p++;
        switch (c) {
        case '"': case '\\': case '/': dst[n++] = c; break;
        case 'b': dst[n++] = '\b'; break;
        case 'f': dst[n++] = '\f'; break;
        case 'n': dst[n++] = '\n'; break;
        case 'r': dst[n++] = '\r'; break;
        case 't': dst[n++] = '\t'; break;
        case 'u': {
            if (end - p < 4) return NULL;
            unsigned cp = 0;
            for (int i = 0; i < 4; i++) {
                int h = hex_value(p[i]);
                if (h < 0) return NULL;
                cp = cp * 16 + h;
            }
            p += 4;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return NULL; /* a lone low surrogate */
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (end - p < 6 || p[0] != '\\' || p[1] != 'u') return NULL;
                unsigned lo = 0;
                for (int i = 2; i < 6; i++) {
                    int h = hex_value(p[i]);
                    if (h < 0) return NULL;
                    lo = lo * 16 + h;
                }
                if (lo < 0xDC00 || lo > 0xDFFF) return NULL;
                p += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            put_utf8(dst, &n, cp); /* at most 4 bytes for the 6 or 12 read */
            break;
        }
        default: return NULL;
        }
    }
    out->len = n;
    return p + 1;
}

static inline int two(const char *s) { return (s[0] - '0') * 10 + (s[1] - '0'); }

/* Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d) {
    y -= m <= 2;
    const int64_t era = (y >= 0 ? y : y - 399) / 400;
    const unsigned yoe = (unsigned)(y - era * 400);
    const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

/* s[0:n] as microseconds if it is `YYYY-MM-DD[ T]HH:MM:SS[.f{1,6}]`, a real date and time of years 1-9999: 1, else 0.
 * The same rule as parse._is_timestamp. */
static int parse_time(const char *s, size_t n, int64_t *out) {
    if (n != 19 && (n < 21 || n > 26)) return 0;
    for (int i = 0; i < 19; i++) {
        char c = s[i];
        if (i == 4 || i == 7) {
            if (c != '-') return 0;
        } else if (i == 10) {
            if (c != ' ' && c != 'T') return 0;
        } else if (i == 13 || i == 16) {
            if (c != ':') return 0;
        } else if (!is_digit(c)) {
            return 0;
        }
    }
    int year = two(s) * 100 + two(s + 2), month = two(s + 5), day = two(s + 8);
    int hour = two(s + 11), minute = two(s + 14), second = two(s + 17);
    static const int month_days[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (year < 1 || month < 1 || month > 12 || day < 1 || day > month_days[month - 1]) return 0;
    if (month == 2 && day == 29 && !(year % 4 == 0 && (year % 100 != 0 || year % 400 == 0))) return 0;
    if (hour > 23 || minute > 59 || second > 59) return 0;
    int64_t micros = 0;
    if (n > 19) {
        if (s[19] != '.') return 0;
        size_t digits = 0;
        for (size_t i = 20; i < n; i++, digits++) {
            if (!is_digit(s[i])) return 0;
            micros = micros * 10 + (s[i] - '0');
        }
        for (; digits < 6; digits++) micros *= 10;
    }
    int64_t seconds = days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second;
    *out = seconds * 1000000 + micros;
    return 1;
}

/* A JSON string whose opening quote is at p[-1], for a timestamp column: *next is set after its closing quote.
 * 1 if it is a timestamp (*out set), 0 if a string that is not, -1 if it is no valid JSON string. */
static int read_time(const char *p, const char *end, int64_t *out, Buf *scratch, const char **next) {
    const char *q = plain_run(p, end);
    if (q < end && *q == '"') {
        *next = q + 1;
        return parse_time(p, (size_t)(q - p), out);
    }
    scratch->len = 0; /* escapes (or a raw control character): decode first, as msgspec would */
    q = read_string(p, end, scratch);
    if (!q) return -1;
    *next = q;
    return parse_time(scratch->data, scratch->len, out);
}

/* The integer token p[0:n] (JSON syntax, no fraction or exponent) if it fits int64: 1, else 0. */
static int int_token(const char *p, size_t n, int64_t *out) {
    int negative = *p == '-';
    const char *d = p + negative, *end = p + n;
    if (end - d > 19) return 0;
    uint64_t value = 0;
    for (; d < end; d++) value = value * 10 + (uint64_t)(*d - '0'); /* 19 digits fit in uint64 */
    if (negative ? value > (uint64_t)INT64_MAX + 1 : value > (uint64_t)INT64_MAX) return 0;
    *out = negative ? (int64_t)(0 - value) : (int64_t)value;
    return 1;
}

#ifdef __GLIBC__
static locale_t c_locale; /* numbers are read with a '.' whatever locale the process set */
#endif

/* The number token p[0:n] (JSON syntax) as the nearest double, as msgspec and Python read it (overflow: inf). */
static double float_token(const char *p, size_t n) {
    char small[80];
    char *text = n < sizeof(small) ? small : malloc(n + 1);
    if (!text) return NAN;
    memcpy(text, p, n);
    text[n] = 0;
#ifdef __GLIBC__
    double value = c_locale ? strtod_l(text, NULL, c_locale) : strtod(text, NULL);
#else
    double value = strtod(text, NULL);
#endif
    if (text != small) free(text);
    return value;
}

#define TWO_53 9007199254740992.0
#define TWO_63 9223372036854775808.0

/* A number token for an integer column: an integer in int64, or a fraction or exponent of an integral value in
 * int64 (1.0, 1e3), as parse._fit takes it. 1 and *out set if it fits, else 0. */
static int fit_int(const char *p, size_t n, int integral, int64_t *out) {
    if (integral) return int_token(p, n, out);
    double d = float_token(p, n);
    if (!(d >= -TWO_63 && d < TWO_63) || d != trunc(d)) return 0; /* NaN and inf fail the range test */
    *out = (int64_t)d;
    return 1;
}

/* A number token for a float column: a finite value, and an integer only if a double holds it exactly. */
static int fit_float(const char *p, size_t n, int integral, double *out) {
    if (integral) {
        int64_t v;
        if (!int_token(p, n, &v) || v > (int64_t)TWO_53 || v < -(int64_t)TWO_53) return 0;
        *out = (double)v; /* "-0" is the integer 0, so 0.0 */
        return 1;
    }
    double d = float_token(p, n);
    if (!isfinite(d)) return 0;
    *out = d;
    return 1;
}

/* ---------------------------------------------------------------------------------------------- lines */

#define MAX_UNKNOWN 16 /* unknown keys in one line before it goes to the slow path */

typedef struct {
    const Parser *parser;
    Column *cols; /* the parser's columns, then `_extra` */
    Column *extra;
    int64_t row;
    int require_uuid;
    uint8_t seen[MAX_COLUMNS];
    Buf scratch;
    int nunknown;
    const char *unknown[MAX_UNKNOWN];
    size_t unknown_len[MAX_UNKNOWN];
} Batch;

static inline void set_bit(uint8_t *bits, int64_t i) { bits[i >> 3] |= (uint8_t)(1u << (i & 7)); }
static inline void clear_bit(uint8_t *bits, int64_t i) { bits[i >> 3] &= (uint8_t)~(1u << (i & 7)); }

/* `"key":value` onto the row's `_extra` object (opened by the first one); -1 if out of memory. */
static int extra_add(Batch *b, const char *key, size_t key_len, const char *value, size_t value_len) {
    Buf *e = &b->extra->data;
    if (buf_reserve(e, key_len + value_len + 4)) return -1;
    e->data[e->len] = e->len == (size_t)b->extra->offsets[b->row] ? '{' : ',';
    e->data[e->len + 1] = '"';
    memcpy(e->data + e->len + 2, key, key_len);
    e->len += key_len + 2;
    e->data[e->len] = '"';
    e->data[e->len + 1] = ':';
    memcpy(e->data + e->len + 2, value, value_len);
    e->len += value_len + 2;
    return 0;
}

static inline int is_blank(const char *p, const char *end) {
    for (; p < end; p++)
        if (!(*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n' || *p == '\v' || *p == '\f')) return 0;
    return 1;
}

/* Undo what a line wrote before it turned out to need the slow path. */
static void rollback(Batch *b, size_t extra_len) {
    int64_t row = b->row;
    for (int col = 0; col < b->parser->ncols; col++) {
        if (!b->seen[col]) continue;
        Column *c = &b->cols[col];
        clear_bit(c->validity, row);
        if (c->bools) clear_bit(c->bools, row);
        if (c->offsets) c->data.len = (size_t)c->offsets[row];
    }
    b->extra->data.len = extra_len;
}

/* Parse one line into row `b->row`: 1 for a row, 0 for a blank line, -1 if it needs the slow path (nothing kept:
 * not valid JSON, not an object, an escaped or repeated key, nesting too deep, no string uuid when one is
 * required). A value that does not fit its column, and an unknown key, go to `_extra` as the slow path puts them. */
static int parse_line(Batch *b, const char *p, const char *end) {
    const Parser *parser = b->parser;
    int64_t row = b->row;
    size_t extra_len = b->extra->data.len;
    memset(b->seen, 0, parser->ncols);
    b->nunknown = 0;
    const char *start = p;
    p = skip_ws(p, end);
    if (p >= end || *p != '{') {
        if (is_blank(start, end)) return 0;
        return -1;
    }
    p = skip_ws(p + 1, end);
    int guess = 0;
    if (p < end && *p == '}') {
        p++;
    } else {
        for (;;) {
            if (p >= end || *p != '"') goto slow;
            const char *key = ++p;
            int col = -1;
            if (guess < parser->ncols) { /* keys usually come in the schema's order: try the next one first */
                Py_ssize_t n = parser->key_lens[guess];
                if (end - key > n && key[n] == '"' && memcmp(key, parser->keys[guess], n) == 0) {
                    col = guess;
                    p = key + n;
                }
            }
            if (col < 0) {
                while (p < end && *p != '"' && *p != '\\' && (uint8_t)*p >= 0x20) p++;
                if (p >= end || *p != '"') goto slow;
                col = lookup(parser, key, p - key, guess);
            }
            size_t key_len = (size_t)(p - key);
            p = skip_ws(p + 1, end);
            if (p >= end || *p != ':') goto slow;
            p = skip_ws(p + 1, end);
            if (p >= end) goto slow;
            if (col < 0) { /* an unknown key: its value, verbatim, to _extra */
                for (int i = 0; i < b->nunknown; i++)
                    if (b->unknown_len[i] == key_len && memcmp(b->unknown[i], key, key_len) == 0) goto slow;
                if (b->nunknown == MAX_UNKNOWN) goto slow;
                b->unknown[b->nunknown] = key;
                b->unknown_len[b->nunknown++] = key_len;
                const char *value_end = skip_value(p, end, 0);
                if (!value_end || extra_add(b, key, key_len, p, (size_t)(value_end - p))) goto slow;
                p = value_end;
            } else {
                if (b->seen[col]) goto slow;
                b->seen[col] = 1;
                guess = col + 1;
                Column *c = &b->cols[col];
                const char *fit = NULL; /* the end of a value stored in its column */
                if (c->kind == K_JSON) {
                    fit = skip_value(p, end, 0);
                    if (!fit) goto slow;
                    if (fit - p != 4 || !is_null(p, fit)) {
                        size_t n = fit - p;
                        if (buf_reserve(&c->data, n)) goto slow;
                        memcpy(c->data.data + c->data.len, p, n);
                        c->data.len += n;
                        set_bit(c->validity, row);
                    }
                } else if (*p == 'n') {
                    if (!is_null(p, end)) goto slow;
                    fit = p + 4;
                } else {
                    int integral, got;
                    const char *q;
                    switch (c->kind) {
                    case K_STRING:
                        if (*p == '"' && !(fit = read_string(p + 1, end, &c->data))) goto slow;
                        break;
                    case K_TIME:
                        if (*p == '"') {
                            got = read_time(p + 1, end, &c->ints[row], &b->scratch, &q);
                            if (got < 0) goto slow;
                            if (got) fit = q;
                        }
                        break;
                    case K_INT:
                    case K_FLOAT:
                        if (*p == '-' || is_digit(*p)) {
                            q = scan_number(p, end, &integral);
                            if (!q) goto slow;
                            got = c->kind == K_INT ? fit_int(p, q - p, integral, &c->ints[row])
                                                   : fit_float(p, q - p, integral, &c->floats[row]);
                            if (got) fit = q;
                        }
                        break;
                    case K_BOOL:
                        if (end - p >= 4 && memcmp(p, "true", 4) == 0) {
                            set_bit(c->bools, row);
                            fit = p + 4;
                        } else if (end - p >= 5 && memcmp(p, "false", 5) == 0) {
                            fit = p + 5;
                        }
                        break;
                    }
                    if (fit) set_bit(c->validity, row);
                }
                if (fit) {
                    p = fit;
                } else { /* a value that does not fit its column: verbatim to _extra, under the key as written */
                    const char *value_end = skip_value(p, end, 0);
                    if (!value_end || extra_add(b, key, key_len, p, (size_t)(value_end - p))) goto slow;
                    p = value_end;
                }
            }
            p = skip_ws(p, end);
            if (p >= end) goto slow;
            if (*p == '}') {
                p++;
                break;
            }
            if (*p != ',') goto slow;
            p = skip_ws(p + 1, end);
        }
    }
    if (skip_ws(p, end) != end) goto slow;
    if (b->require_uuid && parser->uuid_col >= 0 &&
        !(b->cols[parser->uuid_col].validity[row >> 3] & (1u << (row & 7))))
        goto slow;
    Column *x = b->extra;
    if (x->data.len > extra_len) {
        if (buf_reserve(&x->data, 1)) goto slow;
        x->data.data[x->data.len++] = '}';
        set_bit(x->validity, row);
    }
    for (int col = 0; col <= parser->ncols; col++) {
        Column *c = &b->cols[col];
        if (c->offsets && c->data.len > INT32_MAX) goto slow;
    }
    for (int col = 0; col <= parser->ncols; col++) {
        Column *c = &b->cols[col];
        if (c->offsets) c->offsets[row + 1] = (int32_t)c->data.len;
        if (!(c->validity[row >> 3] & (1u << (row & 7)))) c->nulls++;
    }
    b->row++;
    return 1;
slow:
    rollback(b, extra_len);
    clear_bit(b->extra->validity, row);
    return -1;
}

static void free_columns(Column *cols, int n) {
    for (int i = 0; i < n; i++) {
        free(cols[i].validity);
        free(cols[i].offsets);
        free(cols[i].data.data);
        free(cols[i].ints);
        free(cols[i].floats);
        free(cols[i].bools);
    }
    free(cols);
}

/* Room for `rows` rows in every column's fixed-size arrays (new bits and slots zeroed); -1 if out of memory. */
static int grow_rows(Column *cols, int ncols, int64_t old_rows, int64_t rows) {
    size_t old_bitmap = (size_t)(old_rows + 8) / 8, bitmap = (size_t)(rows + 8) / 8;
    for (int i = 0; i < ncols; i++) {
        Column *c = &cols[i];
        void *p;
#define GROW(field, unit, old_n, new_n)                                       \
    if (c->field) {                                                           \
        if (!(p = realloc(c->field, (new_n) * (unit)))) return -1;            \
        memset((char *)p + (old_n) * (unit), 0, ((new_n) - (old_n)) * (unit)); \
        c->field = p;                                                         \
    }
        GROW(validity, 1, old_bitmap, bitmap)
        GROW(bools, 1, old_bitmap, bitmap)
        GROW(offsets, sizeof(int32_t), (size_t)old_rows + 1, (size_t)rows + 1)
        GROW(ints, sizeof(int64_t), (size_t)old_rows + 1, (size_t)rows + 1)
        GROW(floats, sizeof(double), (size_t)old_rows + 1, (size_t)rows + 1)
#undef GROW
    }
    return 0;
}

/* Whether s[0:n] is valid UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF). */
static int utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
#ifdef __SSE2__
        while (i + 16 <= n && !_mm_movemask_epi8(_mm_loadu_si128((const __m128i *)(s + i)))) i += 16;
        if (i >= n) break;
#endif
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (i + len > n) return 0;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
            return 0;
        i += len;
    }
    return 1;
}

/* Memory handed to Python without a copy: a buffer-protocol object that frees it when Arrow lets go. */
typedef struct {
    PyObject_HEAD
    char *data;
    Py_ssize_t len;
} Buffer;

static int Buffer_getbuffer(Buffer *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->len, 1, flags);
}

static void Buffer_dealloc(Buffer *self) {
    free(self->data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyBufferProcs Buffer_as_buffer = {(getbufferproc)Buffer_getbuffer, NULL};

static PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "amplitude_export._fastparse.Buffer",
    .tp_basicsize = sizeof(Buffer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Column memory made by Parser.parse, exposed through the buffer protocol.",
    .tp_dealloc = (destructor)Buffer_dealloc,
    .tp_as_buffer = &Buffer_as_buffer,
};

/* A Buffer owning *data (which is set to NULL: the column no longer frees it). */
static PyObject *take(void *data_ptr, size_t n) {
    char **data = (char **)data_ptr;
    Buffer *b = PyObject_New(Buffer, &BufferType);
    if (!b) return NULL;
    b->data = *data ? *data : malloc(1);
    b->len = (Py_ssize_t)n;
    *data = NULL;
    if (!b->data) {
        Py_DECREF(b);
        return PyErr_NoMemory();
    }
    return (PyObject *)b;
}

static void release_views(Py_buffer *views, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) PyBuffer_Release(&views[i]);
    free(views);
}

typedef struct {
    Py_ssize_t line; /* index of the line in the call's lines */
    const char *start;
    size_t len;
} SlowLine;

static PyObject *Parser_parse(Parser *self, PyObject *args) {
    PyObject *segments;
    int require_uuid = 0;
    if (!PyArg_ParseTuple(args, "O!|p", &PyList_Type, &segments, &require_uuid)) return NULL;
    /* each segment holds whole lines separated by '\n'; a view of each is held while the GIL is released */
    Py_ssize_t nseg = PyList_GET_SIZE(segments);
    Py_buffer *views = calloc(nseg + 1, sizeof(Py_buffer));
    if (!views) return PyErr_NoMemory();
    size_t total = 0;
    for (Py_ssize_t i = 0; i < nseg; i++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(segments, i), &views[i], PyBUF_SIMPLE) < 0) {
            release_views(views, i);
            return NULL;
        }
        total += views[i].len;
    }
    int ncols = self->ncols;
    int64_t cap = (int64_t)(total / 1024) + nseg + 16; /* rows; grown when a batch has shorter lines */
    Column *cols = calloc(ncols + 1, sizeof(Column));
    int64_t *line_of_row = calloc(cap + 1, sizeof(int64_t));
    int failed = !cols || !line_of_row;
    for (int i = 0; i <= ncols && !failed; i++) {
        Column *c = &cols[i];
        c->kind = i < ncols ? self->kinds[i] : K_JSON; /* the last one is _extra */
        size_t bitmap = (size_t)(cap + 8) / 8;
        failed |= !(c->validity = calloc(bitmap, 1));
        switch (c->kind) {
        case K_STRING:
        case K_JSON:
            failed |= !(c->offsets = calloc(cap + 1, sizeof(int32_t)));
            failed |= buf_reserve(&c->data, i == ncols           ? 256
                                            : c->kind == K_JSON ? total / 8 + 64
                                                                : 64 * (size_t)cap + 64);
            break;
        case K_INT:
        case K_TIME:
            failed |= !(c->ints = calloc(cap + 1, sizeof(int64_t)));
            break;
        case K_FLOAT:
            failed |= !(c->floats = calloc(cap + 1, sizeof(double)));
            break;
        case K_BOOL:
            failed |= !(c->bools = calloc(bitmap, 1));
            break;
        }
    }
    if (failed) {
        if (cols) free_columns(cols, ncols + 1);
        free(line_of_row);
        release_views(views, nseg);
        return PyErr_NoMemory();
    }
    Batch batch = {.parser = self, .cols = cols, .extra = &cols[ncols], .row = 0, .require_uuid = require_uuid};
    SlowLine *slow = NULL;
    size_t nslow = 0, slow_cap = 0;
    Py_ssize_t line = 0;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < nseg && ok; i++) {
        const char *p = views[i].buf, *end = p + views[i].len;
        for (;; line++) {
            const char *nl = memchr(p, '\n', end - p);
            const char *line_end = nl ? nl : end;
            if (batch.row == cap) {
                int64_t *more = realloc(line_of_row, (cap * 2 + 1) * sizeof(int64_t));
                if (!more || grow_rows(cols, ncols + 1, cap, cap * 2)) {
                    if (more) line_of_row = more;
                    ok = 0;
                    break;
                }
                line_of_row = more;
                cap *= 2;
            }
            int got = utf8_valid((const uint8_t *)p, line_end - p) ? parse_line(&batch, p, line_end) : -1;
            if (got > 0) {
                line_of_row[batch.row - 1] = line;
            } else if (got < 0) {
                if (nslow == slow_cap) {
                    slow_cap = slow_cap ? slow_cap * 2 : 16;
                    SlowLine *more = realloc(slow, slow_cap * sizeof(SlowLine));
                    if (!more) {
                        ok = 0;
                        break;
                    }
                    slow = more;
                }
                slow[nslow++] = (SlowLine){line, p, (size_t)(line_end - p)};
            }
            if (!nl) break;
            p = nl + 1;
        }
        line++;
    }
    Py_END_ALLOW_THREADS
    free(batch.scratch.data);
    PyObject *slow_list = ok ? PyList_New((Py_ssize_t)nslow) : NULL;
    for (size_t i = 0; slow_list && i < nslow; i++) {
        PyObject *item = Py_BuildValue("(ny#)", slow[i].line, slow[i].start, (Py_ssize_t)slow[i].len);
        if (!item) {
            Py_CLEAR(slow_list);
            break;
        }
        PyList_SET_ITEM(slow_list, (Py_ssize_t)i, item);
    }
    free(slow);
    release_views(views, nseg);
    if (!slow_list) {
        free_columns(cols, ncols + 1);
        free(line_of_row);
        return ok ? NULL : PyErr_NoMemory();
    }
    int64_t rows = batch.row;
    size_t bitmap = (size_t)(rows + 8) / 8;
    PyObject *out = PyTuple_New(ncols + 1);
    PyObject *numbers = NULL;
    if (out && rows != line) { /* some lines were blank or went to the slow path: say which each row is */
        numbers = take(&line_of_row, sizeof(int64_t) * rows);
    } else if (out) {
        numbers = Py_NewRef(Py_None);
    }
    free(line_of_row);
    if (!out || !numbers) {
        Py_XDECREF(out);
        Py_XDECREF(numbers);
        Py_DECREF(slow_list);
        free_columns(cols, ncols + 1);
        return NULL;
    }
    for (int i = 0; i <= ncols; i++) {
        Column *c = &cols[i];
        PyObject *validity = c->nulls ? take(&c->validity, bitmap) : Py_NewRef(Py_None);
        PyObject *values, *data;
        switch (c->kind) {
        case K_STRING:
        case K_JSON:
            values = take(&c->offsets, sizeof(int32_t) * (rows + 1));
            data = take(&c->data.data, c->data.len);
            break;
        case K_INT:
        case K_TIME:
            values = take(&c->ints, sizeof(int64_t) * rows);
            data = Py_NewRef(Py_None);
            break;
        case K_FLOAT:
            values = take(&c->floats, sizeof(double) * rows);
            data = Py_NewRef(Py_None);
            break;
        default:
            values = take(&c->bools, bitmap);
            data = Py_NewRef(Py_None);
            break;
        }
        PyObject *item = (validity && values && data)
                             ? Py_BuildValue("(LNNN)", (long long)c->nulls, validity, values, data)
                             : NULL;
        if (!item) {
            Py_XDECREF(validity);
            Py_XDECREF(values);
            Py_XDECREF(data);
            Py_DECREF(out);
            Py_DECREF(numbers);
            Py_DECREF(slow_list);
            free_columns(cols, ncols + 1);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, item);
    }
    free_columns(cols, ncols + 1);
    return Py_BuildValue("(NLNnN)", out, (long long)rows, numbers, line, slow_list);
}

/* ---------------------------------------------------------------------------------------------- COPY */

/* One column of a batch for encode_copy: Arrow buffers, borrowed for the call. */
typedef struct {
    char kind;
    Py_buffer validity, values, data;
    int has_validity, has_data;
    Py_ssize_t offset;
} CopyColumn;

static inline int valid_at(const CopyColumn *c, Py_ssize_t row) {
    if (!c->has_validity) return 1;
    Py_ssize_t i = c->offset + row;
    return (((const uint8_t *)c->validity.buf)[i >> 3] >> (i & 7)) & 1;
}

static inline void put_be32(char *out, int32_t v) {
    uint32_t u = (uint32_t)v;
    out[0] = (char)(u >> 24); out[1] = (char)(u >> 16); out[2] = (char)(u >> 8); out[3] = (char)u;
}

static inline void put_be64(char *out, uint64_t u) {
    for (int i = 7; i >= 0; i--) {
        out[i] = (char)u;
        u >>= 8;
    }
}

#define PG_EPOCH_US 946684800000000LL /* PostgreSQL counts timestamps from 2000-01-01 UTC */

/* encode_copy(columns, rows, first_seq): binary COPY rows for one batch, and a final bigint field numbering the
 * rows from first_seq (none when first_seq < 0). columns: (kind, validity or None, values, data or None, offset)
 * per column, in order. */
static PyObject *encode_copy(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *columns;
    Py_ssize_t rows;
    long long first_seq;
    if (!PyArg_ParseTuple(args, "O!nL", &PyList_Type, &columns, &rows, &first_seq)) return NULL;
    Py_ssize_t ncols = PyList_GET_SIZE(columns);
    CopyColumn *cols = calloc(ncols + 1, sizeof(CopyColumn));
    if (!cols) return PyErr_NoMemory();
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    char *out = NULL;
    for (; got < ncols; got++) {
        PyObject *item = PyList_GET_ITEM(columns, got), *kind, *validity, *values, *data;
        CopyColumn *c = &cols[got];
        if (!PyArg_ParseTuple(item, "UOOOn", &kind, &validity, &values, &data, &c->offset)) goto done;
        c->kind = (char)PyUnicode_READ_CHAR(kind, 0);
        if (PyObject_GetBuffer(values, &c->values, PyBUF_SIMPLE) < 0) goto done;
        if (validity != Py_None) {
            if (PyObject_GetBuffer(validity, &c->validity, PyBUF_SIMPLE) < 0) {
                PyBuffer_Release(&c->values);
                goto done;
            }
            c->has_validity = 1;
        }
        if (data != Py_None) {
            if (PyObject_GetBuffer(data, &c->data, PyBUF_SIMPLE) < 0) {
                PyBuffer_Release(&c->values);
                if (c->has_validity) PyBuffer_Release(&c->validity);
                goto done;
            }
            c->has_data = 1;
        }
        if (!strchr("sjiftb", c->kind) || ((c->kind == 's' || c->kind == 'j') && !c->has_data)) {
            got++;
            PyErr_SetString(PyExc_ValueError, "a column is (kind in s j i f t b, validity, values, data, offset)");
            goto done;
        }
    }
    /* the size first: 2 bytes of field count per row, 4 of length per field, the values, 12 for the number */
    int numbered = first_seq >= 0;
    size_t size = (size_t)rows * (2 + 4 * (ncols + numbered) + 8 * numbered);
    for (Py_ssize_t i = 0; i < ncols; i++) {
        CopyColumn *c = &cols[i];
        if (c->kind == 's' || c->kind == 'j') {
            const int32_t *offsets = (const int32_t *)c->values.buf + c->offset;
            size += (size_t)(offsets[rows] - offsets[0]);
            if (c->kind == 'j')
                for (Py_ssize_t r = 0; r < rows; r++) size += valid_at(c, r);
        } else {
            for (Py_ssize_t r = 0; r < rows; r++) size += valid_at(c, r) ? (c->kind == 'b' ? 1 : 8) : 0;
        }
    }
    out = malloc(size ? size : 1);
    if (!out) {
        PyErr_NoMemory();
        goto done;
    }
    char *w = out;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
        w[0] = (char)((ncols + numbered) >> 8);
        w[1] = (char)(ncols + numbered);
        w += 2;
        for (Py_ssize_t i = 0; i < ncols; i++) {
            CopyColumn *c = &cols[i];
            if (!valid_at(c, r)) {
                put_be32(w, -1);
                w += 4;
                continue;
            }
            Py_ssize_t at = c->offset + r;
            switch (c->kind) {
            case 's':
            case 'j': {
                const int32_t *offsets = (const int32_t *)c->values.buf;
                int32_t len = offsets[at + 1] - offsets[at];
                put_be32(w, len + (c->kind == 'j'));
                w += 4;
                if (c->kind == 'j') *w++ = 1; /* jsonb's binary form: version 1, then the text */
                memcpy(w, (const char *)c->data.buf + offsets[at], len);
                w += len;
                break;
            }
            case 'i':
                put_be32(w, 8);
                put_be64(w + 4, (uint64_t)((const int64_t *)c->values.buf)[at]);
                w += 12;
                break;
            case 't':
                put_be32(w, 8);
                put_be64(w + 4, (uint64_t)(((const int64_t *)c->values.buf)[at] - PG_EPOCH_US));
                w += 12;
                break;
            case 'f': {
                uint64_t bits;
                memcpy(&bits, (const double *)c->values.buf + at, 8);
                put_be32(w, 8);
                put_be64(w + 4, bits);
                w += 12;
                break;
            }
            default: /* b */
                put_be32(w, 1);
                w[4] = (char)((((const uint8_t *)c->values.buf)[at >> 3] >> (at & 7)) & 1);
                w += 5;
                break;
            }
        }
        if (numbered) {
            put_be32(w, 8);
            put_be64(w + 4, (uint64_t)(first_seq + r));
            w += 12;
        }
    }
    Py_END_ALLOW_THREADS
    result = take(&out, (size_t)(w - out));
done:
    for (Py_ssize_t i = 0; i < got; i++) {
        CopyColumn *c = &cols[i];
        if (c->values.obj) PyBuffer_Release(&c->values);
        if (c->has_validity) PyBuffer_Release(&c->validity);
        if (c->has_data) PyBuffer_Release(&c->data);
    }
    free(cols);
    free(out);
    return result;
}

/* ---------------------------------------------------------------------------------------------- the type */

static int Parser_init(Parser *self, PyObject *args, PyObject *kwds) {
    PyObject *keys;
    const char *kinds;
    Py_ssize_t nkinds;
    static char *kwlist[] = {"keys", "kinds", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!s#", kwlist, &PyTuple_Type, &keys, &kinds, &nkinds)) return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(keys);
    if (n != nkinds || n > MAX_COLUMNS || n >= HASH_SIZE / 2) {
        PyErr_SetString(PyExc_ValueError, "one kind per key, at most 255 keys");
        return -1;
    }
    memset(self->table, 0, sizeof(self->table));
    self->uuid_col = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        if (!PyBytes_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "keys must be bytes");
            return -1;
        }
        if (!strchr("sifbtj", kinds[i])) {
            PyErr_SetString(PyExc_ValueError, "kinds are among s, i, f, b, t, j");
            return -1;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(key);
        char *copy = malloc(len + 1);
        if (!copy) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(copy, PyBytes_AS_STRING(key), len + 1);
        self->keys[i] = copy;
        self->key_lens[i] = len;
        self->kinds[i] = kinds[i];
        self->ncols = (int)i + 1;
        if (len == 4 && memcmp(copy, "uuid", 4) == 0) self->uuid_col = (int)i;
        unsigned slot = key_hash(copy, len) % HASH_SIZE;
        while (self->table[slot]) slot = (slot + 1) % HASH_SIZE;
        self->table[slot] = (int16_t)(i + 1);
    }
    return 0;
}

static void Parser_dealloc(Parser *self) {
    for (int i = 0; i < self->ncols; i++) free(self->keys[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Parser_methods[] = {
    {"parse", (PyCFunction)Parser_parse, METH_VARARGS,
     "parse(segments, require_uuid=False): (columns, rows, numbers, lines, slow). columns: a (null_count,\n"
     "validity, values, data) tuple per column and one for _extra; numbers: each row's line index (None when\n"
     "row i is line i); lines: the lines read; slow: [(line index, bytes)] of the lines left to the slow path.\n"
     "Each segment holds whole lines separated by newlines."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ParserType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "amplitude_export._fastparse.Parser",
    .tp_basicsize = sizeof(Parser),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Parser(keys, kinds): decodes export lines with these top-level keys into Arrow buffers.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Parser_init,
    .tp_dealloc = (destructor)Parser_dealloc,
    .tp_methods = Parser_methods,
};

/* ---------------------------------------------------------------------------------------------- StringSet */

/* The uuids a window has kept so far (sinks.FirstCopies): repeats are found without a Python string per row, in
 * less memory per uuid than a Python set of str. A tag only tells most mismatches apart: a match is always
 * confirmed on the bytes. Each entry is the window's own or "taken" (held by another hour: a row with it is
 * dropped, but it is not one of the window's uuids). */

#define TAKEN_BIT 0x80000000u

typedef struct {
    uint32_t tag; /* the hash's high 32 bits: most mismatches are told apart without touching the bytes */
    uint32_t ref; /* entry index + 1, 0 = empty; TAKEN_BIT set for a taken entry */
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    size_t capacity; /* a power of two */
    size_t entries;  /* own + taken */
    size_t own;
    Buf data;         /* every entry's bytes, one after another */
    int64_t *starts;  /* entry i is data[starts[i]:starts[i + 1]] */
    size_t starts_cap;
} StringSet;

static inline uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ ((uint64_t)n * 0xC2B2AE3D27D4EB4Full);
    while (n >= 8) {
        uint64_t k;
        memcpy(&k, s, 8);
        k *= 0x87C37B91114253D5ull;
        k ^= k >> 31;
        h = (h ^ k) * 0x4CF5AD432745937Full;
        s += 8;
        n -= 8;
    }
    uint64_t k = 0;
    memcpy(&k, s, n);
    h ^= k * 0x87C37B91114253D5ull;
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDull;
    h ^= h >> 33;
    return h;
}

/* Zeroed memory for the slot table; past 4 MB in 2 MB huge pages where the kernel allows (madvise): the table is
 * probed at random, and with 4 kB pages each probe also missed the TLB, and each first touch cost a page fault. */
static void *table_alloc(size_t bytes) {
#ifdef MADV_HUGEPAGE
    if (bytes >= (4u << 20)) {
        void *p = NULL;
        if (posix_memalign(&p, 2u << 20, bytes) != 0) return NULL;
        madvise(p, bytes, MADV_HUGEPAGE);
        memset(p, 0, bytes);
        return p;
    }
#endif
    return calloc(bytes / sizeof(Slot), sizeof(Slot));
}

static inline const char *entry_at(const StringSet *self, size_t entry, size_t *n) {
    *n = (size_t)(self->starts[entry + 1] - self->starts[entry]);
    return self->data.data + self->starts[entry];
}

static int set_grow(StringSet *self) {
    size_t capacity = self->capacity ? self->capacity * 2 : 1024;
    Slot *slots = table_alloc(capacity * sizeof(Slot));
    if (!slots) return -1;
    for (size_t i = 0; i < self->capacity; i++) {
        Slot slot = self->slots[i];
        if (!slot.ref) continue;
        size_t n;
        const char *s = entry_at(self, (slot.ref & ~TAKEN_BIT) - 1, &n);
        size_t at = hash_bytes(s, n) & (capacity - 1); /* the slot keeps only the high bits: hash again */
        while (slots[at].ref) at = (at + 1) & (capacity - 1);
        slots[at] = slot;
    }
    free(self->slots);
    self->slots = slots;
    self->capacity = capacity;
    return 0;
}

/* 1 if s was already in the set; else adds it (taken or own) and returns 0; -1 when out of memory. */
static int set_add(StringSet *self, const char *s, size_t n, int taken) {
    if ((self->entries + 1) * 2 > self->capacity && set_grow(self) < 0) return -1;
    uint64_t h = hash_bytes(s, n);
    size_t at = h & (self->capacity - 1);
    for (;; at = (at + 1) & (self->capacity - 1)) {
        Slot slot = self->slots[at];
        if (!slot.ref) break;
        if (slot.tag != (uint32_t)(h >> 32)) continue;
        size_t len;
        const char *known = entry_at(self, (slot.ref & ~TAKEN_BIT) - 1, &len);
        if (len == n && memcmp(known, s, n) == 0) return 1;
    }
    if (self->entries + 2 > self->starts_cap) {
        size_t cap = self->starts_cap ? self->starts_cap * 2 : 1024;
        int64_t *starts = realloc(self->starts, cap * sizeof(int64_t));
        if (!starts) return -1;
        starts[0] = self->starts ? starts[0] : 0;
        self->starts = starts;
        self->starts_cap = cap;
    }
    if (buf_reserve(&self->data, n + 1) < 0) return -1;
    memcpy(self->data.data + self->data.len, s, n);
    self->data.len += n;
    self->starts[self->entries + 1] = (int64_t)self->data.len;
    self->entries++;
    self->slots[at].tag = (uint32_t)(h >> 32);
    self->slots[at].ref = (uint32_t)self->entries | (taken ? TAKEN_BIT : 0);
    if (!taken) self->own++;
    return 0;
}

/* add(offsets, data, validity, offset, length, taken): every non-null string of an Arrow string array (int32
 * offsets). Returns None when none was in the set before, else an Arrow bitmap of `length` bits, 1 = keep the row
 * (null, or seen here for the first time), 0 = a repeat. */
static PyObject *StringSet_add(StringSet *self, PyObject *args) {
    PyObject *offsets_obj, *data_obj, *validity_obj;
    Py_ssize_t offset, length;
    int taken = 0;
    if (!PyArg_ParseTuple(args, "OOOnn|p", &offsets_obj, &data_obj, &validity_obj, &offset, &length, &taken))
        return NULL;
    if (offset < 0 || length < 0) {
        PyErr_SetString(PyExc_ValueError, "offset and length must not be negative");
        return NULL;
    }
    if (self->entries + (size_t)length >= TAKEN_BIT - 1) {
        PyErr_SetString(PyExc_OverflowError, "too many strings for one StringSet");
        return NULL;
    }
    Py_buffer views[3];
    int has_validity = validity_obj != Py_None;
    if (PyObject_GetBuffer(offsets_obj, &views[0], PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(data_obj, &views[1], PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&views[0]);
        return NULL;
    }
    if (has_validity && PyObject_GetBuffer(validity_obj, &views[2], PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&views[0]);
        PyBuffer_Release(&views[1]);
        return NULL;
    }
    PyObject *result = NULL;
    const int32_t *offsets = (const int32_t *)views[0].buf;
    const char *data = (const char *)views[1].buf;
    const uint8_t *validity = has_validity ? (const uint8_t *)views[2].buf : NULL;
    int bad = views[0].len < (Py_ssize_t)sizeof(int32_t) * (offset + length + 1) ||
              (has_validity && views[2].len * 8 < offset + length);
    for (Py_ssize_t row = 0; !bad && row <= length; row++) /* offsets must stay inside the data */
        bad = offsets[offset + row] < 0 || offsets[offset + row] > views[1].len ||
              (row && offsets[offset + row] < offsets[offset + row - 1]);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "buffers do not hold an Arrow string array of that offset and length");
        goto done;
    }
    size_t nbytes = ((size_t)length + 7) / 8;
    uint8_t *keep = malloc(nbytes ? nbytes : 1);
    if (!keep) {
        PyErr_NoMemory();
        goto done;
    }
    memset(keep, 0xFF, nbytes);
    int repeats = 0, failed = 0;
    /* the GIL is kept: a batch's work is far shorter than getting the GIL back from a busy parse thread */
    for (Py_ssize_t row = 0; row < length; row++) {
        Py_ssize_t i = offset + row;
        if (validity && !((validity[i >> 3] >> (i & 7)) & 1)) continue;
        int found = set_add(self, data + offsets[i], (size_t)(offsets[i + 1] - offsets[i]), taken);
        if (found < 0) {
            failed = 1;
            break;
        }
        if (found) {
            keep[row >> 3] &= (uint8_t)~(1u << (row & 7));
            repeats = 1;
        }
    }
    if (failed) {
        free(keep);
        PyErr_NoMemory();
    } else if (!repeats) {
        free(keep);
        result = Py_NewRef(Py_None);
    } else {
        result = take(&keep, nbytes);
        if (!result) free(keep);
    }
done:
    for (int i = 0; i < 2 + has_validity; i++) PyBuffer_Release(&views[i]);
    return result;
}

/* own(): the window's own entries as (count, offsets, data): an Arrow large_string array's buffers. */
static PyObject *StringSet_own(StringSet *self, PyObject *unused) {
    (void)unused;
    int64_t *offsets = malloc((self->own + 1) * sizeof(int64_t));
    size_t total = 0;
    for (size_t i = 0; i < self->capacity; i++) {
        uint32_t ref = self->slots[i].ref;
        if (ref && !(ref & TAKEN_BIT)) total += (size_t)(self->starts[ref] - self->starts[ref - 1]);
    }
    char *data = malloc(total ? total : 1);
    if (!offsets || !data) {
        free(offsets);
        free(data);
        return PyErr_NoMemory();
    }
    size_t count = 0, at = 0;
    offsets[0] = 0;
    for (size_t i = 0; i < self->capacity; i++) {
        uint32_t ref = self->slots[i].ref;
        if (!ref || (ref & TAKEN_BIT)) continue;
        size_t n = (size_t)(self->starts[ref] - self->starts[ref - 1]);
        memcpy(data + at, self->data.data + self->starts[ref - 1], n);
        at += n;
        offsets[++count] = (int64_t)at;
    }
    PyObject *offsets_buf = take(&offsets, (self->own + 1) * sizeof(int64_t));
    if (!offsets_buf) {
        free(offsets);
        free(data);
        return NULL;
    }
    PyObject *data_buf = take(&data, total);
    if (!data_buf) {
        free(data);
        Py_DECREF(offsets_buf);
        return NULL;
    }
    return Py_BuildValue("nNN", (Py_ssize_t)count, offsets_buf, data_buf);
}

static Py_ssize_t StringSet_len(StringSet *self) { return (Py_ssize_t)self->own; }

static void StringSet_dealloc(StringSet *self) {
    free(self->slots);
    free(self->data.data);
    free(self->starts);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef StringSet_methods[] = {
    {"add", (PyCFunction)StringSet_add, METH_VARARGS,
     "add(offsets, data, validity, offset, length, taken=False): add an Arrow string array's non-null values;\n"
     "None when none was there before, else a bitmap of length bits, 0 where the row's value was a repeat."},
    {"own", (PyCFunction)StringSet_own, METH_NOARGS,
     "own(): (count, offsets, data) of the entries not added as taken: a large_string array's buffers."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods StringSet_as_sequence = {.sq_length = (lenfunc)StringSet_len};

static PyTypeObject StringSetType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "amplitude_export._fastparse.StringSet",
    .tp_basicsize = sizeof(StringSet),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "StringSet(): byte strings seen so far, for dropping repeated uuids (len() counts the own ones).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)StringSet_dealloc,
    .tp_methods = StringSet_methods,
    .tp_as_sequence = &StringSet_as_sequence,
};

static PyMethodDef module_methods[] = {
    {"encode_copy", encode_copy, METH_VARARGS,
     "encode_copy(columns, rows, first_seq): binary COPY rows; columns are (kind, validity, values, data, offset)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastparse", "Export lines to Arrow buffers, and back out.",
                                    -1, module_methods, NULL, NULL, NULL, NULL};

static int add_type(PyObject *m, const char *name, PyTypeObject *type) {
    Py_INCREF(type);
    if (PyModule_AddObject(m, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__fastparse(void) {
    init_tables();
#ifdef __GLIBC__
    if (!c_locale) c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0);
#endif
    if (PyType_Ready(&ParserType) < 0 || PyType_Ready(&BufferType) < 0 || PyType_Ready(&StringSetType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (add_type(m, "Parser", &ParserType) < 0 || add_type(m, "StringSet", &StringSetType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
