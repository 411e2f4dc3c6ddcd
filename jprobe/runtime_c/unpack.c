/* SPDX-License-Identifier: MIT */
/*
 * unpack.c - a packed probe table (jprobe_table.h, "A packed table") made
 * whole: its probes, islands and strings written to their places in the
 * table's segment, and its trampolines laid out again over the packed
 * bytes, from a copy.  This runs before anything else reads the table.
 * Every read and write is checked against the module's own segments: a
 * damaged file gives an error, not a crash of the runtime.
 */
#include "unpack.h"

#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

struct stream {
	const uint8_t *p, *end;
	bool bad;
};

static uint64_t get_u(struct stream *s)
{
	uint64_t value = 0;
	int shift = 0;

	while (s->p < s->end && shift < 64) {
		uint8_t byte = *s->p++;

		value |= (uint64_t)(byte & 0x7f) << shift;
		if (!(byte & 0x80))
			return value;
		shift += 7;
	}
	s->bad = true;
	return 0;
}

static int64_t get_s(struct stream *s)
{
	uint64_t v = get_u(s);

	return v & 1 ? -(int64_t)(v >> 1) - 1 : (int64_t)(v >> 1);
}

static const uint8_t *get_bytes(struct stream *s, uint64_t n)
{
	const uint8_t *at = s->p;

	if ((uint64_t)(s->end - s->p) < n) {
		s->bad = true;
		return NULL;
	}
	s->p += n;
	return at;
}

static struct stream part(const uint8_t *blob, uint64_t size, uint64_t at,
			  uint64_t len)
{
	struct stream s = { blob, blob, true };

	if (jp_within(at, len, 0, size)) {
		s.p = blob + at;
		s.end = s.p + len;
		s.bad = false;
	}
	return s;
}

static bool unpack_probes(struct jp_table *t, uintptr_t bias,
			  const struct jp_packed *h, const uint8_t *blob,
			  uint64_t *pool_len)
{
	struct stream s = part(blob, t->packed_size, h->probes, h->probes_size);
	struct jp_probe *p = (struct jp_probe *)(bias + t->probes);
	char *pool = (char *)(bias + t->strings);
	uint64_t address = 0, i;

	for (i = 0; i < t->nprobes && !s.bad; i++) {
		uint64_t spec = 0, len;
		const uint8_t *kind, *orig;
		uint8_t ext = 0;

		kind = get_bytes(&s, 1);
		if (!kind)
			return false;
		if (*kind & JP_KIND_EXT) {
			const uint8_t *e = get_bytes(&s, 1);

			if (!e)
				return false;
			ext = *e;
		}
		if (*kind & JP_KIND_NEXT)
			address += i ? p[i - 1].len : 0;
		else
			address += get_s(&s);
		p[i].address = address;
		p[i].mechanism = *kind & 3;
		p[i].handler = ext & 1;
		p[i].flags = ext >> 1 & (JP_PROBE_X87 | JP_PROBE_NOVEC);
		if (ext & JP_EXT_STRINGS) {
			spec = get_u(&s);
			p[i].lib = get_u(&s);
			p[i].func = get_u(&s);
		}
		p[i].depends = ext & JP_EXT_DEPENDS ? 1 + i + get_s(&s) : 0;
		len = *kind >> JP_KIND_LEN_SHIFT & 15;
		if (!len)
			len = get_u(&s);
		orig = get_bytes(&s, len);
		if (s.bad || len > sizeof(p[i].original) || p[i].depends > t->nprobes)
			return false;
		if (!spec) {
			char text[24];
			int n = snprintf(text, sizeof(text), "0x%lx", (unsigned long)address);

			if (*pool_len + n + 1 > t->strings_size)
				return false;
			spec = *pool_len;
			memcpy(pool + spec, text, n + 1);
			*pool_len += n + 1;
		}
		p[i].spec = spec;
		p[i].id = i;
		p[i].len = len;
		memcpy(p[i].original, orig, len);
		if (p[i].flags & JP_PROBE_NOVEC) {
			const uint8_t *id = get_bytes(&s, 8);

			if (!id)
				return false;
			memcpy(&p[i].cb_build_id, id, 8);
		}
	}
	return !s.bad && s.p == s.end;
}

/*
 * Each island is where a rel32 in its probe's patched code lands, and hops
 * to where its probe's code starts (`entry`, from the text) or a little on.
 */
static bool unpack_islands(const struct dl_phdr_info *info, struct jp_table *t,
			   const struct jp_packed *h, const uint8_t *blob,
			   const uint64_t *entry)
{
	struct stream s = part(blob, t->packed_size, h->islands, h->islands_size);
	uintptr_t bias = info->dlpi_addr;
	struct jp_island *isl = (struct jp_island *)(bias + t->islands);
	const struct jp_probe *p = (const struct jp_probe *)(bias + t->probes);
	int64_t probe = 0;
	uint32_t i;

	for (i = 0; i < t->nislands && !s.bad; i++) {
		uint64_t off, site;
		int32_t rel;

		probe += get_s(&s);
		off = get_u(&s);
		if (s.bad || probe < 0 || (uint64_t)probe >= t->nprobes ||
		    off >> 1 > JP_PATCH_MAX || !entry[probe])
			return false;
		site = p[probe].address + (off >> 1);
		if (!jp_in_segment(info, site, 4, PF_R | PF_X))
			return false;
		memcpy(&rel, (const void *)(bias + site), 4);
		isl[i].at = site + 4 + rel;
		isl[i].target = entry[probe] + (off & 1 ? get_s(&s) : 0);
		isl[i].probe = probe;
		isl[i].len = 5;
		isl[i].fixup = 1;
		isl[i].code[0] = 0xe9;
		rel = (int32_t)(isl[i].target - (isl[i].at + 5));
		memcpy(&isl[i].code[1], &rel, 4);
	}
	return !s.bad && s.p == s.end;
}

static int64_t unzigzag(uint64_t v)
{
	return v & 1 ? -(int64_t)(v >> 1) - 1 : (int64_t)(v >> 1);
}

/* Template k for probe `owner` at offset pos of the text; its size, or 0. */
static uint64_t fill_template(struct jp_table *t, uint64_t table_vaddr,
			      const struct jp_template *c, uint64_t owner,
			      uint8_t *out, uint64_t pos)
{
	uint64_t n = c->len, here = t->text + pos;
	uint64_t hits = t->probes + owner * sizeof(struct jp_probe) +
			offsetof(struct jp_probe, hits);
	uint64_t tls = table_vaddr + offsetof(struct jp_table, tls_off);
	int i;

	if (n > sizeof(c->code) || c->nholes > 6 || n > t->text_size - pos)
		return 0;
	memcpy(out + pos, c->code, n);
	for (i = 0; i < c->nholes; i++) {
		const struct jp_hole *hole = &c->holes[i];
		uint8_t *field = out + pos + hole->at;

		if ((uint64_t)hole->at + 4 > n)
			return 0;
		if (hole->kind == JP_HOLE_HITS)
			jp_put32(field, hits - (here + hole->end));
		else if (hole->kind == JP_HOLE_TLS)
			jp_put32(field, tls - (here + hole->end));
		else if (hole->kind == JP_HOLE_SLOT)
			jp_put32(field, 8 * owner);
		else
			return 0;
	}
	return n;
}

/* The trampolines, into `out` (text_size bytes, at link-time address t->text). */
static bool unpack_text(struct jp_table *t, uintptr_t bias, uint64_t table_vaddr,
			const struct jp_packed *h, const uint8_t *blob,
			uint8_t *out, uint64_t *entry)
{
	struct stream s = part(blob, t->packed_size, h->text, h->text_size);
	const struct jp_template *tpl;
	struct jp_probe *p = (struct jp_probe *)(bias + t->probes);
	uint64_t pos = 0;
	int64_t owner = -1;		/* none yet */

	if (!t->nprobes || h->templates > t->packed_size ||
	    h->ntemplates > (t->packed_size - h->templates) / sizeof(*tpl))
		return false;
	tpl = (const struct jp_template *)(blob + h->templates);
	while (s.p < s.end && !s.bad) {
		uint8_t op = *s.p >> 5;
		uint64_t arg = *s.p++ & 0x1f, n = 0, k = 0;
		int64_t probe;
		const uint8_t *src;

		if (arg == JP_OP_ARG)
			arg = get_u(&s);
		if (op == JP_OP_PROBE || op == JP_OP_COUNT) {
			owner += unzigzag(op == JP_OP_COUNT ? arg >> 3 : arg);
			if (owner < 0 || (uint64_t)owner >= t->nprobes)
				return false;
			if (!entry[owner])
				entry[owner] = t->text + pos;
		} else if (owner < 0 && op != JP_OP_LIT) {
			return false;
		}
		switch (op) {
		case JP_OP_LIT:
			n = arg;
			src = get_bytes(&s, n);
			if (!src || n > t->text_size - pos)
				return false;
			memcpy(out + pos, src, n);
			break;
		case JP_OP_PROBE:
			break;
		case JP_OP_RESUME:
			probe = owner + unzigzag(arg);
			if (probe < 0 || (uint64_t)probe >= t->nprobes)
				return false;
			p[probe].resume = t->text + pos;
			break;
		case JP_OP_COUNT:
			if ((arg & 3) >= h->ntemplates)
				return false;
			n = fill_template(t, table_vaddr, &tpl[arg & 3], owner, out, pos);
			if (!n)
				return false;
			if (arg & JP_COUNT_RESUMES)
				p[owner].resume = t->text + pos + n;
			break;
		case JP_OP_COPY:
			k = get_u(&s);
			/* fall through */
		case JP_OP_COPY0:
			n = arg;
			if (k > p[owner].len || n > p[owner].len - k || n > t->text_size - pos)
				return false;
			memcpy(out + pos, p[owner].original + k, n);
			break;
		case JP_OP_JMP:
			n = 5;
			if (n > t->text_size - pos)
				return false;
			out[pos] = 0xe9;
			jp_put32(out + pos + 1, p[owner].address + unzigzag(arg) - (t->text + pos + 5));
			break;
		case JP_OP_COPYJMP:
			n = arg + 5;
			if (arg > p[owner].len || n > t->text_size - pos)
				return false;
			memcpy(out + pos, p[owner].original, arg);
			out[pos + arg] = 0xe9;
			jp_put32(out + pos + arg + 1,
			      p[owner].address + arg - (t->text + pos + arg + 5));
			break;
		default:
			return false;
		}
		pos += n;
	}
	return !s.bad && pos == t->text_size;
}

/*
 * Unpack `t` (at link-time address table_vaddr) of the module `info`
 * describes.  False, with an error recorded, when it is damaged.
 */
bool jp_unpack_table(const struct dl_phdr_info *info, struct jp_table *t,
		  uint64_t table_vaddr)
{
	uintptr_t bias = info->dlpi_addr;
	const struct jp_packed *h;
	uint64_t pool_len, lo, hi, page = 4096, *entry;
	uint8_t *blob;
	bool ok;

	if (t->unpacked)
		return true;
	if (!jp_in_segment(info, t->text, t->text_size, PF_R | PF_X) ||
	    !jp_in_segment(info, t->packed, t->packed_size, PF_R) ||
	    t->packed < t->text || t->packed_size < sizeof(*h) ||
	    !jp_in_segment(info, t->probes, (uint64_t)t->nprobes * sizeof(struct jp_probe), PF_R | PF_W) ||
	    !jp_in_segment(info, t->islands, (uint64_t)t->nislands * sizeof(struct jp_island), PF_R | PF_W) ||
	    !jp_in_segment(info, t->strings, t->strings_size, PF_R | PF_W))
		return false;
	blob = mmap(NULL, t->packed_size, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (blob == MAP_FAILED)
		return false;
	memcpy(blob, (void *)(bias + t->packed), t->packed_size);
	h = (const struct jp_packed *)blob;
	pool_len = h->strings_size;
	ok = !memcmp(h->magic, JP_PACKED_MAGIC, sizeof(h->magic)) &&
	     jp_within(h->strings, pool_len, 0, t->packed_size) &&
	     pool_len <= t->strings_size;
	if (ok) {
		memcpy((void *)(bias + t->strings), blob + h->strings, pool_len);
		ok = unpack_probes(t, bias, h, blob, &pool_len);
	}
	lo = (bias + t->text) & ~(page - 1);
	hi = (bias + t->text + t->text_size + page - 1) & ~(page - 1);
	entry = mmap(NULL, (t->nprobes + 1) * sizeof(*entry), PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ok = ok && entry != MAP_FAILED && !mprotect((void *)lo, hi - lo, PROT_READ | PROT_WRITE);
	if (ok) {
		ok = unpack_text(t, bias, table_vaddr, h, blob, (uint8_t *)(bias + t->text), entry) &&
		     unpack_islands(info, t, h, blob, entry);
		mprotect((void *)lo, hi - lo, PROT_READ | PROT_EXEC);
	}
	if (entry != MAP_FAILED)
		munmap(entry, (t->nprobes + 1) * sizeof(*entry));
	munmap(blob, t->packed_size);
	if (ok)
		t->unpacked = 1;
	return ok;
}
