// SPDX-License-Identifier: MIT
/*
 * report.c - the JSON report (SPEC §3) a patched program writes at exit
 * when JPROBE_REPORT is set.  (Under `jprobe run` the counters file takes
 * its place: jprobe reads it after the process tree has ended.)
 */
#include "report.h"
#include "modules.h"
#include "rings.h"
#include "threads.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char *report_path;	/* absolute: the program may chdir() */
static bool report_path_empty;	/* JPROBE_REPORT is set, to "" */
static pid_t own_pid;		/* getpid() at start-up and after fork() */
static bool forked_child;	/* set in a child of fork() */
/* Brings the module list up to date before a report (startup.c registers it). */
static void (*refresh)(void);

struct buf {
	char *p;
	size_t len, cap;
	bool oom;
};

static void put(struct buf *b, const char *s, size_t n)
{
	if (b->oom)
		return;
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		char *p;

		while (b->len + n + 1 > cap)
			cap *= 2;
		p = realloc(b->p, cap);
		if (!p) {
			b->oom = true;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static void puts_(struct buf *b, const char *s)
{
	put(b, s, strlen(s));
}

static __attribute__((format(printf, 2, 3)))
void putf(struct buf *b, const char *fmt, ...)
{
	char tmp[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	if (n > 0)
		put(b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* Length of the valid UTF-8 sequence at s, or 0 if it is not one. */
static size_t utf8_len(const unsigned char *s)
{
	size_t n, i;
	uint32_t c;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xc2 && s[0] <= 0xdf)
		n = 2, c = s[0] & 0x1f;
	else if (s[0] >= 0xe0 && s[0] <= 0xef)
		n = 3, c = s[0] & 0x0f;
	else if (s[0] >= 0xf0 && s[0] <= 0xf4)
		n = 4, c = s[0] & 0x07;
	else
		return 0;
	for (i = 1; i < n; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		c = (c << 6) | (s[i] & 0x3f);
	}
	if ((n == 3 && (c < 0x800 || (c >= 0xd800 && c <= 0xdfff))) ||
	    (n == 4 && (c < 0x10000 || c > 0x10ffff)))
		return 0;
	return n;
}

/*
 * A JSON string of the first `len` bytes of `str`.  Paths are bytes, not
 * text: a byte that is not valid UTF-8 becomes U+FFFD so that the report
 * always parses.
 */
static void put_json_chars(struct buf *b, const char *str, size_t len)
{
	const unsigned char *s = (const unsigned char *)str;
	const unsigned char *end = s + len;

	put(b, "\"", 1);
	while (s < end) {
		size_t n = utf8_len(s);

		if (*s == '"' || *s == '\\') {
			put(b, "\\", 1);
			put(b, (const char *)s, 1);
		} else if (*s == '\n') {
			puts_(b, "\\n");
		} else if (*s == '\t') {
			puts_(b, "\\t");
		} else if (*s < 0x20 || *s == 0x7f) {
			putf(b, "\\u%04x", *s);
		} else if (!n) {
			puts_(b, "\\ufffd");
			n = 1;
		} else {
			put(b, (const char *)s, n);
			s += n;
			continue;
		}
		s++;
	}
	put(b, "\"", 1);
}

static void put_json_string(struct buf *b, const char *str)
{
	put_json_chars(b, str, strlen(str));
}

static const char *mechanism_name(unsigned int mech)
{
	switch (mech) {
	case JP_MECH_JUMP: return "jump";
	case JP_MECH_PUN: return "pun";
	case JP_MECH_EVICT: return "evict";
	case JP_MECH_TRAP: return "trap";
	default: return "unknown";
	}
}

/* A trace probe's events inline in the report; more go to a file of JSON lines. */
#define JP_REPORT_EVENTS	1000

/* What one walk over the rings does with the records of one probe. */
struct events {
	uint64_t key;		/* word 0's probe id and module key */
	const char *names;	/* trace(...)'s argument names, "arg1,rax" */
	const char *probe;	/* the probe's name, for the events file */
	size_t probe_len;
	struct buf *b;		/* where they are written, NULL: only counted */
	bool lines;		/* JSON lines of their own (the events file) */
	uint64_t n;
};

static void put_event(void *arg, const struct jp_ring *r, const uint64_t *rec, uint32_t words)
{
	struct events *e = arg;
	const char *name = e->names;
	uint32_t i;

	if ((rec[0] & ((UINT64_C(1) << JP_REC_WORDS_SHIFT) - 1)) != e->key)
		return;
	if (e->b) {
		if (e->lines) {
			putf(e->b, "{\"t_ns\": %" PRIu64 ", \"tid\": %u, \"pid\": %u, \"probe\": ",
			     jp_tsc_to_ns(rec[1]), r->tid, r->pid);
			put_json_chars(e->b, e->probe, e->probe_len);
			puts_(e->b, ", \"args\": {");
		} else {
			putf(e->b, "%s{\"t_ns\": %" PRIu64 ", \"tid\": %u, \"args\": {",
			     e->n ? ", " : "", jp_tsc_to_ns(rec[1]), r->tid);
		}
		for (i = 2; i < words && *name; i++) {
			const char *end = strchrnul(name, ',');

			bool ns = end - name == 8 && !strncmp(name, "duration", 8);

			putf(e->b, "%s\"%.*s\": %" PRIu64, i > 2 ? ", " : "", (int)(end - name), name,
			     ns ? jp_ticks_to_ns(rec[i]) : rec[i]);
			name = *end ? end + 1 : end;
		}
		puts_(e->b, e->lines ? "}}\n" : "}}");
	}
	e->n++;
}

/*
 * A trace probe's handler, lost records and events: inline when few, else
 * (once, for its first name) as JSON lines in PATH.PID.events.
 */
static void put_trace(struct buf *b, const struct jp_module *m, const struct jp_probe *p,
		      const char *name, size_t len, bool first_name)
{
	const char *names = jp_table_string(m, p->trace);
	uint64_t key = p->id | (uint64_t)jp_module_key(m) << JP_REC_KEY_SHIFT;
	struct events e = { key, names, name, len, NULL, false, 0 };
	struct buf lines = { 0 };
	char *path;
	int fd;

	jp_rings_each_record(put_event, &e);
	putf(b, ", \"lost\": %" PRIu64, __atomic_load_n(&p->lost, __ATOMIC_RELAXED));
	if (e.n <= JP_REPORT_EVENTS) {
		puts_(b, ", \"events\": [");
		e.b = b;
		e.n = 0;
		jp_rings_each_record(put_event, &e);
		puts_(b, "]");
		return;
	}
	path = malloc(strlen(report_path) + 32);
	if (!path)
		return;
	snprintf(path, strlen(report_path) + 32, "%s.%d.events", report_path, (int)getpid());
	if (first_name) {
		e.b = &lines;
		e.lines = true;
		e.n = 0;
		jp_rings_each_record(put_event, &e);
		fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0666);
		if (fd >= 0) {
			if (!lines.oom)
				write(fd, lines.p, lines.len);
			close(fd);
		}
		free(lines.p);
	}
	puts_(b, ", \"events_file\": ");
	put_json_string(b, path);
	putf(b, ", \"events_count\": %" PRIu64, e.n);
	free(path);
}

/* The entry of one name of probe `p` (the first `len` bytes of `name`). */
static void put_probe(struct buf *b, const struct jp_module *m,
		      const struct jp_probe *p, const char *name, size_t len, bool first_name)
{
	puts_(b, "{\"probe\": ");
	put_json_chars(b, name, len);
	puts_(b, ", \"module\": ");
	put_json_string(b, m->name);
	putf(b, ", \"address\": \"0x%" PRIx64 "\", \"mechanism\": \"%s\", \"handler\": ",
	     p->address, mechanism_name(p->mechanism));
	if (p->handler == JP_HANDLER_CALLBACK) {
		char *h = jp_concat3(jp_table_string(m, p->lib), ":",
				  jp_table_string(m, p->func));

		put_json_string(b, h ? h : "callback");
		free(h);
	} else if (p->handler == JP_HANDLER_TRACE) {
		putf(b, p->trace ? "\"trace(%s)\"" : "\"trace\"", jp_table_string(m, p->trace));
	} else {
		puts_(b, "\"count\"");
	}
	putf(b, ", \"hits\": %" PRIu64, jp_probe_hits(m, p - jp_probes_of(m)));
	if (p->handler == JP_HANDLER_TRACE)
		put_trace(b, m, p, name, len, first_name);
	else
		puts_(b, ", \"lost\": 0");
	if (p->handler == JP_HANDLER_CALLBACK)
		putf(b, ", \"missed\": %" PRIu64 ", \"callback_skipped\": %" PRIu64,
		     __atomic_load_n(&p->missed, __ATOMIC_RELAXED),
		     __atomic_load_n(&p->skipped, __ATOMIC_RELAXED));
	if (p->flags & JP_PROBE_RETURN)
		putf(b, ", \"returns_missed\": %" PRIu64,
		     __atomic_load_n(&p->ret_missed, __ATOMIC_RELAXED));
	if (__atomic_load_n(&p->flags, __ATOMIC_RELAXED) & JP_PROBE_UNPATCHED)
		puts_(b, ", \"patched\": false");
	puts_(b, "}");
}

/*
 * The JSON of SPEC §3 for every live module; false if nothing to say.
 * Called with the blocks locked (jp_lock_blocks()), so no thread folds its
 * counts meanwhile.
 */
static bool build_report(struct buf *b)
{
	bool first = true, any = false;
	int i;
	uint32_t j;

	putf(b, "{\"pid\": %d, \"executable\": ", (int)getpid());
	put_json_string(b, jp_exe_path());
	puts_(b, ",\n \"probes\": [");
	for (i = 0; i < jp_module_count(); i++) {
		const struct jp_module *m = jp_module_at(i);

		if (!m->live || m->foreign)
			continue;
		any = true;
		for (j = 0; j < m->table->nprobes; j++) {
			/* aliases at one address: one site, one line of its spec per name */
			const struct jp_probe *p = &jp_probes_of(m)[j];
			const char *spec = jp_table_string(m, p->spec), *name = spec, *end;

			do {
				end = strchrnul(name, '\n');
				puts_(b, first ? "\n  " : ",\n  ");
				put_probe(b, m, p, name, end - name, name == spec);
				first = false;
				name = end + 1;
			} while (*end);
		}
	}
	puts_(b, "],\n \"errors\": [");
	for (i = 0; i < jp_nerrors(); i++) {
		if (i)
			puts_(b, ", ");
		put_json_string(b, jp_error(i));
	}
	puts_(b, "]}\n");
	return any && !b->oom;
}

/* The pid a report file starts with ({"pid": N, ...}), or -1. */
static long report_pid(const char *path)
{
	char head[64], *p, *end;
	long pid;
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -1;
	n = read(fd, head, sizeof(head) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	head[n] = '\0';
	p = strstr(head, "\"pid\"");
	if (!p)
		return -1;
	p += 5;
	while (*p == ' ' || *p == ':' || *p == '\t' || *p == '\n')
		p++;
	pid = strtol(p, &end, 10);
	return end == p ? -1 : pid;
}

static bool write_all(int fd, const char *p, size_t len)
{
	while (len) {
		ssize_t n = write(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return false;
		p += n;
		len -= n;
	}
	return true;
}

/*
 * The user asked for a report and gets none: one line on stderr whatever
 * JPROBE_DEBUG says.  Not from a forked child: its parent says the same.
 */
static void no_report(const char *path, const char *why)
{
	if (!forked_child)
		dprintf(STDERR_FILENO, "jprobe: no report written to JPROBE_REPORT=%s: %s; "
			"set it to the path of a file that can be written\n", path, why);
}

/*
 * Write atomically: a temporary file, then link() to PATH, which fails if
 * PATH exists, so two processes exiting together cannot both take it.  If
 * PATH holds another process's report, ours goes to PATH.PID; anything else
 * in PATH (an empty file made for us) is replaced.  A forked child goes to
 * PATH.PID straight away: it usually exits before the parent that waits for
 * it, and PATH is the parent's.
 */
static void publish_report(const char *report_path, const char *text, size_t len)
{
	char tmp[PATH_MAX], alt[PATH_MAX];
	const char *target = report_path;
	struct stat st;
	long other;
	int fd, err;

	if (!stat(report_path, &st) && S_ISDIR(st.st_mode)) {
		no_report(report_path, "it is a directory");
		return;
	}
	snprintf(tmp, sizeof(tmp), "%s.tmp.%d", report_path, (int)getpid());
	snprintf(alt, sizeof(alt), "%s.%d", report_path, (int)getpid());
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
	if (fd < 0) {
		no_report(report_path, strerror(errno));
		return;
	}
	if (!write_all(fd, text, len) || close(fd)) {
		err = errno;
		unlink(tmp);
		no_report(report_path, strerror(err));
		return;
	}
	if (forked_child) {
		target = alt;
	} else if (!link(tmp, report_path)) {
		unlink(tmp);
		return;
	} else {
		other = report_pid(report_path);
		if (other > 0 && other != getpid())
			target = alt;
	}
	if (rename(tmp, target)) {
		err = errno;
		unlink(tmp);
		no_report(target, strerror(err));
	}
}

/* Write the report to `path` (absolute), if there is anything to report. */
static void write_report(const char *path)
{
	struct buf b = { 0 };
	bool ok;

	jp_lock_blocks();
	ok = build_report(&b);
	jp_unlock_blocks();
	if (ok)
		publish_report(path, b.p, b.len);
	free(b.p);
}

/* A module whose probes the report would list. */
static bool any_live_module(void)
{
	int i;

	for (i = 0; i < jp_module_count(); i++)
		if (jp_module_at(i)->live && !jp_module_at(i)->foreign)
			return true;
	return false;
}

/*
 * JPROBE_REPORT set to the empty string names no file; the start-up takes it
 * for unset (jp_report_set_up()), so say it here, at exit, in the process that would
 * have written the report.
 */
__attribute__((destructor))
static void say_report_path_empty(void)
{
	if (report_path_empty && any_live_module())
		no_report("", "it is empty");
}

/*
 * At start-up: JPROBE_REPORT's value (`path`, NULL when unset), and the
 * function that brings the module list up to date before a report.  The
 * report sits below start-up (rt.h), which registers that function here.
 */
void jp_report_set_up(const char *path, void (*refresh_modules)(void))
{
	own_pid = getpid();
	if (path && *path)
		report_path = jp_absolute(path);
	report_path_empty = path && !*path;
	refresh = refresh_modules;
}

/* `jprobe run`: the counters file takes the report's place. */
void jp_report_off(void)
{
	report_path = NULL;
}

/* In a forked child: its report goes to a file of its own. */
void jp_report_child_fork(void)
{
	forked_child = true;
	own_pid = getpid();
}

/*
 * The report so far: at exit (startup.c), and before an exec or an _exit
 * (exec.c).  Not from the child of a vfork(), which runs on its parent's
 * memory and counts: those hits are the parent's to report.
 */
void jp_report_own_hits(void)
{
	if (!report_path || getpid() != own_pid)
		return;
	refresh();
	write_report(report_path);
}
