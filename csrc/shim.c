/* shim.c - one C function per LUO ioctl, plus the syscalls Python lacks.
 *
 * Every function returns its result (a new fd, or 0) or -errno; meaning lives in Python.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/kexec.h>
#include <linux/reboot.h>
#include "luo_abi.h"

/* Where the build finds the kernel's own header, prove ours equal at compile time. */
#if defined(__has_include)
#if __has_include(<linux/liveupdate.h>)
#include "abi_check.c"
#define LUO_ABI_CHECKED 1
#endif
#endif
#ifndef LUO_ABI_CHECKED
#define LUO_ABI_CHECKED 0
#endif

/* struct sizes, exported to Python as constants (e.g. for decoding traced ioctls) */
#define LUO_SESSION_ARG_SIZE sizeof(struct luo_session_arg)
#define LUO_FD_ARG_SIZE sizeof(struct luo_fd_arg)
#define LUO_FINISH_ARG_SIZE sizeof(struct luo_finish_arg)
#define LUO_GET_NAME_ARG_SIZE sizeof(struct luo_get_name_arg)

static int luo_session_ioctl(int devfd, unsigned long cmd, const char *name)
{
	struct luo_session_arg arg;
	size_t len = strlen(name);

	if (len == 0 || len >= LUO_SESSION_NAME_LENGTH)
		return -EINVAL; /* Python validates first; never send an unterminated name */
	memset(&arg, 0, sizeof(arg));
	arg.size = sizeof(arg);
	memcpy(arg.name, name, len);
	if (ioctl(devfd, cmd, &arg) < 0)
		return -errno;
	return arg.fd;
}

int luo_create_session(int devfd, const char *name)
{
	return luo_session_ioctl(devfd, LUO_IOCTL_CREATE_SESSION, name);
}

int luo_retrieve_session(int devfd, const char *name)
{
	return luo_session_ioctl(devfd, LUO_IOCTL_RETRIEVE_SESSION, name);
}

int luo_preserve_fd(int sfd, int fd, uint64_t token)
{
	struct luo_fd_arg arg = { .size = sizeof(arg), .fd = fd, .token = token };

	return ioctl(sfd, LUO_IOCTL_PRESERVE_FD, &arg) < 0 ? -errno : 0;
}

int luo_retrieve_fd(int sfd, uint64_t token)
{
	struct luo_fd_arg arg = { .size = sizeof(arg), .fd = -1, .token = token };

	return ioctl(sfd, LUO_IOCTL_RETRIEVE_FD, &arg) < 0 ? -errno : arg.fd;
}

int luo_finish(int sfd)
{
	struct luo_finish_arg arg = { .size = sizeof(arg) };

	return ioctl(sfd, LUO_IOCTL_FINISH, &arg) < 0 ? -errno : 0;
}

/* buf must hold LUO_SESSION_NAME_LENGTH bytes; it receives the NUL-terminated name. */
int luo_get_name(int sfd, char *buf)
{
	struct luo_get_name_arg arg;

	memset(&arg, 0, sizeof(arg));
	arg.size = sizeof(arg);
	if (ioctl(sfd, LUO_IOCTL_GET_NAME, &arg) < 0)
		return -errno;
	memcpy(buf, arg.name, LUO_SESSION_NAME_LENGTH);
	buf[LUO_SESSION_NAME_LENGTH - 1] = '\0';
	return 0;
}

long sys_kexec_file_load(int kernel_fd, int initrd_fd, unsigned long cmdline_len,
			 const char *cmdline, unsigned long flags)
{
	return syscall(SYS_kexec_file_load, kernel_fd, initrd_fd, cmdline_len, cmdline, flags) < 0
		       ? -errno : 0;
}

/* Only returns on failure: on success the machine is already running the loaded kernel. */
int sys_reboot_kexec(void)
{
	return syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
		       LINUX_REBOOT_CMD_KEXEC, NULL) < 0 ? -errno : 0;
}

int sys_pidfd_getfd(int pidfd, int targetfd, unsigned int flags)
{
	long fd = syscall(SYS_pidfd_getfd, pidfd, targetfd, flags);

	return fd < 0 ? -errno : (int)fd;
}
