/* PID 1 of the lab's Linux guest: a workload whose continuity can be checked from outside.
 *
 * - memory: a 2 MiB region it keeps rewriting, with a running checksum it updates on every
 *   write and re-verifies against the whole region every 2 s (mem_ok / mem_bad);
 * - disk: sequence-numbered, checksummed 512-byte records appended to /dev/vda, each followed
 *   by fsync; only then is the record acknowledged (last_ack);
 * - network: eth0 = 10.0.2.15/24; a TCP service on port 7000 answers every connection with one
 *   line: boot_id, uptime, last_ack, mem_ok, mem_bad, writes.
 * Static, no libc beyond what glibc's static archive gives; built by luoagent/lab/linux_guest.py. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* small, and every worker mostly sleeps: under nested TCG a busier guest (16 MiB, 10-20 ms
 * pauses) took 180-210 s to answer its first TCP connection */
#define REGION_BYTES (2u << 20)
#define RECORD_MAGIC 0x4C55524543ull /* "CERUL" */
#define PORT 7000

struct record {
	uint64_t magic, seq, t_ns, sum;
	uint8_t pad[512 - 32];
};

static volatile uint64_t last_ack, mem_ok, mem_bad, writes;
static uint64_t *region;
static uint64_t running_sum;
static pthread_mutex_t mem_lock = PTHREAD_MUTEX_INITIALIZER;
static char boot_id[64] = "unknown";

static uint64_t now_ns(int clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static uint64_t record_sum(const struct record *r)
{
	return (r->magic * 0x9E3779B97F4A7C15ull) ^ (r->seq * 0xC2B2AE3D27D4EB4Full) ^ r->t_ns;
}

static void *memory_worker(void *arg)
{
	uint64_t x = 88172645463325252ull, words = REGION_BYTES / 8;
	(void)arg;
	for (;;) {
		for (int i = 0; i < 256; i++) {
			x ^= x << 13; x ^= x >> 7; x ^= x << 17; /* xorshift64 */
			uint64_t idx = x % words;
			pthread_mutex_lock(&mem_lock);
			running_sum += x - region[idx];
			region[idx] = x;
			pthread_mutex_unlock(&mem_lock);
			writes++;
		}
		usleep(100000);
	}
	return NULL;
}

static void *verify_worker(void *arg)
{
	(void)arg;
	for (;;) {
		sleep(2);
		pthread_mutex_lock(&mem_lock);
		uint64_t sum = 0;
		for (uint64_t i = 0; i < REGION_BYTES / 8; i++)
			sum += region[i];
		if (sum == running_sum)
			mem_ok++;
		else
			mem_bad++;
		pthread_mutex_unlock(&mem_lock);
	}
	return NULL;
}

static void *disk_worker(void *arg)
{
	(void)arg;
	int fd = open("/dev/vda", O_RDWR);
	if (fd < 0) {
		perror("linux-guest: open /dev/vda");
		return NULL;
	}
	for (uint64_t seq = 1;; seq++) {
		struct record r = {.magic = RECORD_MAGIC, .seq = seq, .t_ns = now_ns(CLOCK_REALTIME)};
		r.sum = record_sum(&r);
		if (pwrite(fd, &r, sizeof r, (off_t)seq * sizeof r) != sizeof r || fsync(fd) != 0) {
			perror("linux-guest: record");
			sleep(1);
			seq--;
			continue;
		}
		last_ack = seq; /* only after fsync returned */
		usleep(200000);
	}
	return NULL;
}

static int net_up(void)
{
	int s = socket(AF_INET, SOCK_DGRAM, 0);
	struct ifreq ifr;
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	for (const char *name = "lo";; name = "eth0") {
		memset(&ifr, 0, sizeof ifr);
		strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
		if (strcmp(name, "eth0") == 0) {
			sin->sin_family = AF_INET;
			inet_pton(AF_INET, "10.0.2.15", &sin->sin_addr);
			if (ioctl(s, SIOCSIFADDR, &ifr) < 0)
				return perror("linux-guest: SIOCSIFADDR eth0"), -1;
			inet_pton(AF_INET, "255.255.255.0", &sin->sin_addr);
			if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0)
				return perror("linux-guest: SIOCSIFNETMASK"), -1;
		}
		ioctl(s, SIOCGIFFLAGS, &ifr);
		ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
		if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
			return perror("linux-guest: SIOCSIFFLAGS"), -1;
		if (strcmp(name, "eth0") == 0)
			break;
	}
	close(s);
	return 0;
}

static void serve(void)
{
	int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(PORT)};
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 8) < 0) {
		perror("linux-guest: listen");
		return;
	}
	printf("linux-guest: serving on 10.0.2.15:%d\n", PORT);
	fflush(stdout);
	for (;;) {
		int c = accept(s, NULL, NULL);
		if (c < 0)
			continue;
		char line[256];
		int n = snprintf(line, sizeof line,
				 "boot_id=%s uptime_ns=%llu last_ack=%llu mem_ok=%llu mem_bad=%llu writes=%llu\n",
				 boot_id, (unsigned long long)now_ns(CLOCK_BOOTTIME), (unsigned long long)last_ack,
				 (unsigned long long)mem_ok, (unsigned long long)mem_bad,
				 (unsigned long long)writes);
		if (write(c, line, n) != n)
			perror("linux-guest: reply");
		close(c);
	}
}

int main(void)
{
	mkdir("/proc", 0755);
	mkdir("/sys", 0755);
	mkdir("/dev", 0755);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	int b = open("/proc/sys/kernel/random/boot_id", O_RDONLY);
	if (b >= 0) {
		ssize_t n = read(b, boot_id, sizeof boot_id - 1);
		boot_id[n > 0 ? n - 1 : 0] = 0; /* drop the newline */
		close(b);
	}
	printf("linux-guest start boot_id=%s\n", boot_id);
	fflush(stdout);
	region = malloc(REGION_BYTES);
	memset(region, 0, REGION_BYTES);
	running_sum = 0;
	if (net_up() < 0)
		printf("linux-guest: network setup failed\n");
	pthread_t t;
	pthread_create(&t, NULL, memory_worker, NULL);
	pthread_create(&t, NULL, verify_worker, NULL);
	pthread_create(&t, NULL, disk_worker, NULL);
	serve();
	for (;;)
		pause();
}
