/* swaptest: write a verifiable pattern over N MiB of anonymous memory, read it back.
 *
 * Run in a guest with little RAM and netswap as its only swap, it forces the kernel
 * to swap the pattern out and back in. Every 4 KiB page carries its own index and
 * the seed in its first 16 bytes and a xorshift64* stream seeded from both in the
 * rest, so a page that comes back from the wrong slot, stale, torn or zeroed is
 * caught, and named. One wrong byte is a FAIL.
 *
 * usage: swaptest MIB SEED     output lines start with SWAPTEST
 * SWAPTEST_CORRUPT=PAGE in the environment flips a byte of PAGE (the verifier's self-test).
 * SWAPTEST_CONTENT=mixed: pages like real memory's rather than random (netswap compresses,
 * #31; the corpus of real anonymous memory: tests/corpus/RESULTS.md): 2 % all zero, 1 %
 * one 8-byte word repeated (the page's own, so it still names the page), 15 % random,
 * the rest text-like -- after the index and seed, runs of 1-4 copies of 8-byte tokens
 * drawn from a table of 32. netswap's payloads come to 0.41 of the pages' bytes (the
 * corpus: 0.42). Every page is still verified whole.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096

static uint64_t next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static int mixed;
static uint64_t tokens[32];

static void fill(uint64_t *p, uint64_t index, uint64_t seed) {
    uint64_t s = (seed ^ (index * 0x9E3779B97F4A7C15ULL)) | 1;
    uint64_t kind = mixed ? next(&s) % 100 : 99;
    if (kind < 2) {
        memset(p, 0, PAGE);
        return;
    }
    if (kind < 3) {
        uint64_t word = (index * 0x9E3779B97F4A7C15ULL) ^ seed ^ 0x5A5A5A5A5A5A5A5AULL;
        for (size_t i = 0; i < PAGE / 8; i++) p[i] = word;
        return;
    }
    p[0] = index;
    p[1] = seed;
    if (kind < 18 || kind == 99) {
        for (size_t i = 2; i < PAGE / 8; i++) p[i] = next(&s);
        return;
    }
    for (size_t i = 2; i < PAGE / 8;) {
        uint64_t r = next(&s), token = tokens[r & 31], run = 1 + ((r >> 8) & 3);
        for (; run && i < PAGE / 8; run--) p[i++] = token;
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: swaptest MIB SEED\n");
        return 2;
    }
    uint64_t mib = strtoull(argv[1], NULL, 10), seed = strtoull(argv[2], NULL, 10);
    const char *content = getenv("SWAPTEST_CONTENT");
    mixed = content != NULL && strcmp(content, "mixed") == 0;
    uint64_t t = seed | 1;
    for (size_t i = 0; i < 32; i++) tokens[i] = next(&t);
    uint64_t pages = mib * 256;
    uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("SWAPTEST mmap");
        return 2;
    }
    uint64_t expect[PAGE / 8];
    double t0 = now();
    for (uint64_t i = 0; i < pages; i++) {
        fill(mem + i * (PAGE / 8), i, seed);
        if (i % (pages / 10) == 0)
            printf("SWAPTEST progress write %llu%%\n", (unsigned long long)(i * 100 / pages)), fflush(stdout);
    }
    double t1 = now();
    /* Self-test hook: SWAPTEST_CORRUPT=PAGE flips one byte of PAGE before the check. */
    const char *corrupt = getenv("SWAPTEST_CORRUPT");
    if (corrupt && strtoull(corrupt, NULL, 10) < pages)
        ((unsigned char *)(mem + strtoull(corrupt, NULL, 10) * (PAGE / 8)))[1234] ^= 1;
    uint64_t verified = 0;
    for (uint64_t i = 0; i < pages; i++) {
        fill(expect, i, seed);
        if (memcmp(mem + i * (PAGE / 8), expect, PAGE) != 0) {
            const unsigned char *a = (const void *)(mem + i * (PAGE / 8)), *b = (const void *)expect;
            size_t off = 0;
            while (off < PAGE && a[off] == b[off]) off++;
            printf("SWAPTEST FAIL page=%llu offset=%zu got_index=%llu got_seed=%llu\n",
                   (unsigned long long)i, off, (unsigned long long)mem[i * (PAGE / 8)],
                   (unsigned long long)mem[i * (PAGE / 8) + 1]);
            return 1;
        }
        verified++;
        if (i % (pages / 10) == 0)
            printf("SWAPTEST progress verify %llu%%\n", (unsigned long long)(i * 100 / pages)), fflush(stdout);
    }
    double t2 = now();
    printf("SWAPTEST PASS pages=%llu verified=%llu write_s=%.2f verify_s=%.2f\n",
           (unsigned long long)pages, (unsigned long long)verified, t1 - t0, t2 - t1);
    return 0;
}
