/* luo_trace_prog.c - a tracee for tests/test_trace.py and benchmarks/bench_trace.py.
 *
 * Issues LUO ioctl requests (numbers and structs from csrc/luo_abi.h) on fds that are not
 * /dev/liveupdate, so they fail on any kernel, and prints what it sent so a test can compare
 * the tracer's decoding with the truth:
 *   CALL <label> <pid> <request-hex> <ioctl-fd> <arg-pointer-hex> <errno>
 * Modes: decode | fork | threads | threadexec | kexec | loop | threadloop | bench N luo|getppid
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/kexec.h>
#include <linux/reboot.h>
#include "luo_abi.h"

static void call(const char *label, unsigned long request, int fd, void *arg)
{
	int rc = ioctl(fd, request, arg);
	int err = rc < 0 ? errno : 0;

	printf("CALL %s %d 0x%lx %d 0x%lx %d\n", label, (int)getpid(), request, fd,
	       (unsigned long)arg, err);
	fflush(stdout);
}

static void session_call(const char *label, unsigned long request, int fd, const char *name)
{
	struct luo_session_arg arg;

	memset(&arg, 0, sizeof(arg));
	arg.size = sizeof(arg);
	arg.fd = -1;
	strncpy((char *)arg.name, name, sizeof(arg.name) - 1);
	call(label, request, fd, &arg);
}

static void fd_call(const char *label, unsigned long request, int fd, int target, uint64_t token)
{
	struct luo_fd_arg arg = { .size = sizeof(arg), .fd = target, .token = token };

	call(label, request, fd, &arg);
}

static int mode_decode(void)
{
	int null_fd = open("/dev/null", O_RDWR);
	int mfd = memfd_create("luo-trace-test", 0);
	char long_name[LUO_SESSION_NAME_LENGTH];
	struct luo_session_arg unterminated;
	struct luo_finish_arg finish = { .size = sizeof(finish) };
	struct luo_get_name_arg get_name;
	void *page;

	if (null_fd < 0 || mfd < 0) {
		perror("open /dev/null or memfd_create");
		return 1;
	}
	/* a 63-byte name: the longest the kernel accepts (64 bytes with its NUL) */
	for (int i = 0; i < LUO_SESSION_NAME_LENGTH - 1; i++)
		long_name[i] = 'a' + i % 26;
	long_name[LUO_SESSION_NAME_LENGTH - 1] = '\0';

	session_call("create", LUO_IOCTL_CREATE_SESSION, null_fd, "luoagent/vm/alpha");
	session_call("create_long", LUO_IOCTL_CREATE_SESSION, null_fd, long_name);
	session_call("retrieve", LUO_IOCTL_RETRIEVE_SESSION, mfd, "luoagent/vm/beta");

	memset(&unterminated, 0, sizeof(unterminated));
	unterminated.size = sizeof(unterminated);
	unterminated.fd = -1;
	memset(unterminated.name, 'x', sizeof(unterminated.name));
	call("create_unterminated", LUO_IOCTL_CREATE_SESSION, null_fd, &unterminated);

	fd_call("preserve_0", LUO_IOCTL_PRESERVE_FD, mfd, mfd, 0);
	fd_call("preserve_max", LUO_IOCTL_PRESERVE_FD, mfd, mfd, UINT64_MAX);
	fd_call("retrieve_fd", LUO_IOCTL_RETRIEVE_FD, null_fd, -1, 0x8000000000000001ULL);
	call("finish", LUO_IOCTL_FINISH, mfd, &finish);

	memset(&get_name, 0, sizeof(get_name));
	get_name.size = sizeof(get_name);
	strcpy((char *)get_name.name, "prefilled");
	call("get_name", LUO_IOCTL_GET_NAME, null_fd, &get_name);

	/* a pointer to memory the process does not have mapped (any more) */
	page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (page == MAP_FAILED || munmap(page, 4096) != 0) {
		perror("mmap/munmap");
		return 1;
	}
	call("bad_pointer", LUO_IOCTL_CREATE_SESSION, null_fd, page);
	/* a kernel-half address: beyond what /proc/PID/mem can even seek to */
	call("kernel_pointer", LUO_IOCTL_PRESERVE_FD, null_fd, (void *)0xffff888000001000UL);
	call("null_pointer", LUO_IOCTL_FINISH, null_fd, NULL);

	/* the device node itself: absent on hosts without LUO */
	int dev = open("/dev/liveupdate", O_RDWR);
	printf("OPEN %d %d\n", dev, dev < 0 ? errno : 0);
	if (dev >= 0)
		close(dev);
	close(mfd);
	close(null_fd);
	return 0;
}

static int mode_fork(void)
{
	int null_fd = open("/dev/null", O_RDWR);
	pid_t child;
	int status;

	session_call("parent", LUO_IOCTL_CREATE_SESSION, null_fd, "parent-session");
	child = fork();
	if (child < 0) {
		perror("fork");
		return 1;
	}
	if (child == 0) {
		session_call("child", LUO_IOCTL_CREATE_SESSION, null_fd, "child-session");
		_exit(7);
	}
	if (waitpid(child, &status, 0) != child) {
		perror("waitpid");
		return 1;
	}
	printf("CHILD %d %d\n", (int)child, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	return 0;
}

static void *thread_call(void *unused)
{
	int null_fd = open("/dev/null", O_RDWR);

	(void)unused;
	printf("TID %d\n", (int)syscall(SYS_gettid));
	session_call("thread", LUO_IOCTL_CREATE_SESSION, null_fd, "thread-session");
	close(null_fd);
	return NULL;
}

static int mode_threads(void)
{
	pthread_t thread;

	if (pthread_create(&thread, NULL, thread_call, NULL) != 0 || pthread_join(thread, NULL) != 0) {
		perror("pthread");
		return 1;
	}
	return 0;
}

/* kexec_file_load and reboot(KEXEC) as the tracer must show them, made harmless first: the
 * process drops CAP_SYS_BOOT (both calls then fail with EPERM before doing anything), the
 * reboot magic is wrong on purpose, and the "kernel" is an empty memfd. */
static int mode_kexec(void)
{
	struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
	struct __user_cap_data_struct caps[_LINUX_CAPABILITY_U32S_3];
	const char *cmdline = "console=ttyS0 luoagent.trace=test";
	int kernel_fd;
	long rc;

	if (syscall(SYS_capget, &header, caps) != 0) {
		perror("capget");
		return 1;
	}
	caps[CAP_TO_INDEX(CAP_SYS_BOOT)].effective &= ~CAP_TO_MASK(CAP_SYS_BOOT);
	caps[CAP_TO_INDEX(CAP_SYS_BOOT)].permitted &= ~CAP_TO_MASK(CAP_SYS_BOOT);
	caps[CAP_TO_INDEX(CAP_SYS_BOOT)].inheritable &= ~CAP_TO_MASK(CAP_SYS_BOOT);
	if (syscall(SYS_capset, &header, caps) != 0 || syscall(SYS_capget, &header, caps) != 0 ||
	    (caps[CAP_TO_INDEX(CAP_SYS_BOOT)].effective & CAP_TO_MASK(CAP_SYS_BOOT))) {
		fprintf(stderr, "cannot drop CAP_SYS_BOOT: refusing to call reboot()\n");
		return 1;
	}
	kernel_fd = memfd_create("not-a-kernel", 0);
	rc = syscall(SYS_kexec_file_load, kernel_fd, -1, strlen(cmdline) + 1, cmdline,
		     KEXEC_FILE_NO_INITRAMFS);
	printf("KEXEC %d %ld %d\n", kernel_fd, rc, rc < 0 ? errno : 0);
	rc = syscall(SYS_reboot, 0, 0, LINUX_REBOOT_CMD_KEXEC, NULL);
	printf("REBOOT %ld %d\n", rc, rc < 0 ? errno : 0);
	return 0;
}

static char *self_path;

/* a non-leader thread replaces the whole process: execve gives it the leader's pid */
static void *thread_exec(void *unused)
{
	(void)unused;
	execl(self_path, self_path, "fork", (char *)NULL);
	perror("execl");
	exit(1);
}

static int mode_threadexec(void)
{
	pthread_t thread;

	if (pthread_create(&thread, NULL, thread_exec, NULL) != 0) {
		perror("pthread_create");
		return 1;
	}
	pause();
	return 1;
}

/* each thread: an LUO ioctl named after it, a 20 ms sleep, a TICK line; forever */
static void *loop_body(void *label)
{
	int null_fd = open("/dev/null", O_RDWR);
	struct timespec pause = { .tv_sec = 0, .tv_nsec = 20 * 1000 * 1000 };

	for (unsigned long tick = 0;; tick++) {
		struct luo_session_arg arg;

		memset(&arg, 0, sizeof(arg));
		arg.size = sizeof(arg);
		snprintf((char *)arg.name, sizeof(arg.name), "%s-%lu", (const char *)label, tick);
		ioctl(null_fd, LUO_IOCTL_CREATE_SESSION, &arg);
		printf("TICK %s %lu\n", (const char *)label, tick);
		fflush(stdout);
		nanosleep(&pause, NULL);
	}
	return NULL;
}

static _Noreturn void mode_threadloop(void)
{
	pthread_t thread;

	printf("READY %d\n", (int)getpid());
	fflush(stdout);
	if (pthread_create(&thread, NULL, loop_body, "worker") != 0) {
		perror("pthread_create");
		exit(1);
	}
	loop_body("main");
	exit(0);
}

static _Noreturn void mode_loop(void)
{
	int null_fd = open("/dev/null", O_RDWR);
	struct timespec pause = { .tv_sec = 0, .tv_nsec = 20 * 1000 * 1000 };

	printf("READY %d\n", (int)getpid());
	fflush(stdout);
	for (unsigned long tick = 0;; tick++) {
		struct luo_session_arg arg;

		memset(&arg, 0, sizeof(arg));
		arg.size = sizeof(arg);
		snprintf((char *)arg.name, sizeof(arg.name), "loop-%lu", tick);
		ioctl(null_fd, LUO_IOCTL_CREATE_SESSION, &arg);
		printf("TICK %lu\n", tick);
		fflush(stdout);
		nanosleep(&pause, NULL);
	}
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int mode_bench(long n, const char *what)
{
	int null_fd = open("/dev/null", O_RDWR);
	struct luo_session_arg arg;
	double start;

	memset(&arg, 0, sizeof(arg));
	arg.size = sizeof(arg);
	strcpy((char *)arg.name, "bench");
	start = now();
	for (long i = 0; i < n; i++) {
		if (strcmp(what, "luo") == 0)
			ioctl(null_fd, LUO_IOCTL_CREATE_SESSION, &arg);
		else
			syscall(SYS_getppid);
	}
	printf("BENCH %s %ld %.6f\n", what, n, now() - start);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && strcmp(argv[1], "decode") == 0)
		return mode_decode();
	if (argc >= 2 && strcmp(argv[1], "fork") == 0)
		return mode_fork();
	self_path = argv[0];
	if (argc >= 2 && strcmp(argv[1], "threads") == 0)
		return mode_threads();
	if (argc >= 2 && strcmp(argv[1], "threadexec") == 0)
		return mode_threadexec();
	if (argc >= 2 && strcmp(argv[1], "kexec") == 0)
		return mode_kexec();
	if (argc >= 2 && strcmp(argv[1], "loop") == 0)
		mode_loop();
	if (argc >= 2 && strcmp(argv[1], "threadloop") == 0)
		mode_threadloop();
	if (argc >= 4 && strcmp(argv[1], "bench") == 0)
		return mode_bench(atol(argv[2]), argv[3]);
	fprintf(stderr, "usage: %s decode | fork | threads | threadexec | kexec | loop | threadloop | bench N luo|getppid\n", argv[0]);
	return 2;
}
