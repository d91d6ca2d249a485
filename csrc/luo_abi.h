/* luo_abi.h - luoagent's own statement of the Live Update Orchestrator uAPI.
 *
 * Written from the facts of include/uapi/linux/liveupdate.h (Linux >= 6.19, checked
 * against 7.2) so the shim builds on hosts whose kernel headers predate LUO.
 * abi_check.c proves every size, offset and ioctl number here equals the kernel's.
 * Each fact is #ifndef-guarded so a test can change one with -D and watch the proof fail.
 */
#ifndef LUOAGENT_LUO_ABI_H
#define LUOAGENT_LUO_ABI_H

#include <stdint.h>
#include <linux/ioctl.h>

#ifndef LUO_IOCTL_TYPE
#define LUO_IOCTL_TYPE 0xBA
#endif
/* bytes in a session name, including the terminating NUL */
#ifndef LUO_SESSION_NAME_LENGTH
#define LUO_SESSION_NAME_LENGTH 64
#endif

/* command numbers on /dev/liveupdate */
#ifndef LUO_CMD_CREATE_SESSION
#define LUO_CMD_CREATE_SESSION 0x00
#endif
#ifndef LUO_CMD_RETRIEVE_SESSION
#define LUO_CMD_RETRIEVE_SESSION 0x01
#endif
/* command numbers on a session fd */
#ifndef LUO_CMD_PRESERVE_FD
#define LUO_CMD_PRESERVE_FD 0x40
#endif
#ifndef LUO_CMD_RETRIEVE_FD
#define LUO_CMD_RETRIEVE_FD 0x41
#endif
#ifndef LUO_CMD_FINISH
#define LUO_CMD_FINISH 0x42
#endif
#ifndef LUO_CMD_GET_NAME
#define LUO_CMD_GET_NAME 0x43
#endif

#define LUO_IOCTL_CREATE_SESSION   _IO(LUO_IOCTL_TYPE, LUO_CMD_CREATE_SESSION)
#define LUO_IOCTL_RETRIEVE_SESSION _IO(LUO_IOCTL_TYPE, LUO_CMD_RETRIEVE_SESSION)
#define LUO_IOCTL_PRESERVE_FD      _IO(LUO_IOCTL_TYPE, LUO_CMD_PRESERVE_FD)
#define LUO_IOCTL_RETRIEVE_FD      _IO(LUO_IOCTL_TYPE, LUO_CMD_RETRIEVE_FD)
#define LUO_IOCTL_FINISH           _IO(LUO_IOCTL_TYPE, LUO_CMD_FINISH)
#define LUO_IOCTL_GET_NAME         _IO(LUO_IOCTL_TYPE, LUO_CMD_GET_NAME)

/* Every argument starts with its own size: the kernel uses it to version the struct and
 * rejects non-zero bytes beyond what it understands (E2BIG). */

/* CREATE_SESSION and RETRIEVE_SESSION share one layout: name in, new session fd out. */
struct luo_session_arg {
	uint32_t size;
	int32_t fd;
	uint8_t name[LUO_SESSION_NAME_LENGTH];
};

/* PRESERVE_FD (fd in) and RETRIEVE_FD (fd out) share one layout; token is 8-aligned. */
struct luo_fd_arg {
	uint32_t size;
	int32_t fd;
	uint64_t token __attribute__((aligned(8)));
};

struct luo_finish_arg {
	uint32_t size;
	uint32_t reserved;
};

struct luo_get_name_arg {
	uint32_t size;
	uint32_t reserved;
	uint8_t name[LUO_SESSION_NAME_LENGTH];
};

#endif
