/*
 * vme-io: the guest side of bench/io.py, for guests that have busybox only.
 * Static, no dependencies; built by the bench for each guest architecture and added to the
 * guest's initramfs for the bench run only (a second cpio archive after the image's own).
 *
 *   vme-io now
 *       CLOCK_MONOTONIC as seconds with nanoseconds: busybox's date has no %N and
 *       /proc/uptime counts only hundredths.
 *   vme-io randread DEV FIRST_MIB SPAN_MIB COUNT SEED
 *       COUNT reads of 4 KiB, one at a time (queue depth 1), at 4 KiB-aligned offsets drawn
 *       uniformly from [FIRST_MIB, FIRST_MIB + SPAN_MIB) MiB of DEV, with O_DIRECT so every
 *       read reaches the device. Prints "ops=N bytes=B ns=T". A shell loop of dd would
 *       measure process start-up, not the disk.
 *   vme-io send IP PORT BYTES
 *   vme-io recv IP PORT
 *       TCP with 256 KiB system calls, the bulk counterpart of busybox nc (which moves 1 KiB
 *       per call, so that the guest's CPU rather than the network device sets its pace).
 *       send writes BYTES zeros, shuts its side down and waits for the peer to close; recv
 *       reads to EOF. Both print "bytes=B ns=T", timed from connect to the end.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define CHUNK (256 * 1024)

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* xorshift64*: fast, and the same sequence on every machine for a given seed. */
static uint64_t next(uint64_t *s)
{
	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * 0x2545F4914F6CDD1DULL;
}

static unsigned long long number(const char *what, const char *text)
{
	char *end;
	unsigned long long v = strtoull(text, &end, 10);
	if (*text == '\0' || *end != '\0') {
		fprintf(stderr, "vme-io: %s %s is not a whole number\n", what, text);
		exit(2);
	}
	return v;
}

static int randread(char **argv)
{
	unsigned long long first = number("FIRST_MIB", argv[1]) << 20;
	unsigned long long blocks = (number("SPAN_MIB", argv[2]) << 20) / BLOCK;
	unsigned long long count = number("COUNT", argv[3]);
	uint64_t seed = number("SEED", argv[4]) | 1;
	void *buf;
	int fd = open(argv[0], O_RDONLY | O_DIRECT);
	if (fd < 0) {
		perror("vme-io: open");
		return 1;
	}
	if (blocks == 0) {
		fprintf(stderr, "vme-io: SPAN_MIB must be at least 1\n");
		return 2;
	}
	if (posix_memalign(&buf, BLOCK, BLOCK) != 0) {
		fprintf(stderr, "vme-io: no memory for a 4 KiB buffer\n");
		return 1;
	}
	uint64_t t0 = now_ns();
	for (unsigned long long i = 0; i < count; i++) {
		off_t at = (off_t)(first + next(&seed) % blocks * BLOCK);
		if (pread(fd, buf, BLOCK, at) != BLOCK) {
			perror("vme-io: pread");
			return 1;
		}
	}
	uint64_t t1 = now_ns();
	printf("ops=%llu bytes=%llu ns=%llu\n", count, count * BLOCK,
	       (unsigned long long)(t1 - t0));
	return 0;
}

static int dial(const char *ip, const char *port)
{
	struct sockaddr_in sa = {.sin_family = AF_INET};
	sa.sin_port = htons((unsigned short)number("PORT", port));
	if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) {
		fprintf(stderr, "vme-io: %s is not an IPv4 address\n", ip);
		exit(2);
	}
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
		perror("vme-io: connect");
		exit(1);
	}
	return fd;
}

static int tcp(int sending, char **argv)
{
	unsigned long long want = sending ? number("BYTES", argv[2]) : 0, moved = 0;
	static char buf[CHUNK];
	uint64_t t0 = now_ns();
	int fd = dial(argv[0], argv[1]);
	while (sending ? moved < want : 1) {
		size_t n = sending && want - moved < CHUNK ? (size_t)(want - moved) : CHUNK;
		ssize_t r = sending ? write(fd, buf, n) : read(fd, buf, n);
		if (r < 0) {
			perror(sending ? "vme-io: write" : "vme-io: read");
			return 1;
		}
		if (r == 0)
			break;
		moved += (unsigned long long)r;
	}
	if (sending) {
		/* Done when the peer has everything: it closes after reading EOF. */
		shutdown(fd, SHUT_WR);
		while (read(fd, buf, CHUNK) > 0)
			;
	}
	uint64_t t1 = now_ns();
	printf("bytes=%llu ns=%llu\n", moved, (unsigned long long)(t1 - t0));
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 2 && strcmp(argv[1], "now") == 0) {
		uint64_t t = now_ns();
		printf("%llu.%09llu\n", (unsigned long long)(t / 1000000000u),
		       (unsigned long long)(t % 1000000000u));
		return 0;
	}
	if (argc == 7 && strcmp(argv[1], "randread") == 0)
		return randread(argv + 2);
	if (argc == 5 && strcmp(argv[1], "send") == 0)
		return tcp(1, argv + 2);
	if (argc == 4 && strcmp(argv[1], "recv") == 0)
		return tcp(0, argv + 2);
	fprintf(stderr, "usage: vme-io now | vme-io randread DEV FIRST_MIB SPAN_MIB COUNT SEED |\n"
			"       vme-io send IP PORT BYTES | vme-io recv IP PORT\n");
	return 2;
}
