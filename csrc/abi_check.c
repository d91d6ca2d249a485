/* abi_check.c - compile-time proof that luo_abi.h matches the kernel's linux/liveupdate.h.
 *
 * Compiles to nothing; any differing size, offset, command or ioctl number is a compile error.
 * Built by build_shim.py when the real header is on the include path, and by tests/test_abi.py
 * against the header of Debian's linux-libc-dev 7.x.
 */
#include <stddef.h>
#include <linux/liveupdate.h>
#include "luo_abi.h"

#define SAME(ours, theirs) _Static_assert((ours) == (theirs), #ours " != " #theirs)
#define SAME_FIELD(our_s, their_s, our_f, their_f)                                      \
	SAME(offsetof(struct our_s, our_f), offsetof(struct their_s, their_f));           \
	SAME(sizeof(((struct our_s *)0)->our_f), sizeof(((struct their_s *)0)->their_f))

SAME(LUO_IOCTL_TYPE, LIVEUPDATE_IOCTL_TYPE);
SAME(LUO_SESSION_NAME_LENGTH, LIVEUPDATE_SESSION_NAME_LENGTH);

SAME(LUO_CMD_CREATE_SESSION, LIVEUPDATE_CMD_CREATE_SESSION);
SAME(LUO_CMD_RETRIEVE_SESSION, LIVEUPDATE_CMD_RETRIEVE_SESSION);
SAME(LUO_CMD_PRESERVE_FD, LIVEUPDATE_CMD_SESSION_PRESERVE_FD);
SAME(LUO_CMD_RETRIEVE_FD, LIVEUPDATE_CMD_SESSION_RETRIEVE_FD);
SAME(LUO_CMD_FINISH, LIVEUPDATE_CMD_SESSION_FINISH);
SAME(LUO_CMD_GET_NAME, LIVEUPDATE_CMD_SESSION_GET_NAME);

SAME(LUO_IOCTL_CREATE_SESSION, LIVEUPDATE_IOCTL_CREATE_SESSION);
SAME(LUO_IOCTL_RETRIEVE_SESSION, LIVEUPDATE_IOCTL_RETRIEVE_SESSION);
SAME(LUO_IOCTL_PRESERVE_FD, LIVEUPDATE_SESSION_PRESERVE_FD);
SAME(LUO_IOCTL_RETRIEVE_FD, LIVEUPDATE_SESSION_RETRIEVE_FD);
SAME(LUO_IOCTL_FINISH, LIVEUPDATE_SESSION_FINISH);
SAME(LUO_IOCTL_GET_NAME, LIVEUPDATE_SESSION_GET_NAME);

#define SAME_SESSION(theirs)                                                            \
	SAME(sizeof(struct luo_session_arg), sizeof(struct theirs));                      \
	SAME(_Alignof(struct luo_session_arg), _Alignof(struct theirs));                  \
	SAME_FIELD(luo_session_arg, theirs, size, size);                                  \
	SAME_FIELD(luo_session_arg, theirs, fd, fd);                                      \
	SAME_FIELD(luo_session_arg, theirs, name, name)
SAME_SESSION(liveupdate_ioctl_create_session);
SAME_SESSION(liveupdate_ioctl_retrieve_session);

#define SAME_FD(theirs)                                                                 \
	SAME(sizeof(struct luo_fd_arg), sizeof(struct theirs));                           \
	SAME(_Alignof(struct luo_fd_arg), _Alignof(struct theirs));                       \
	SAME_FIELD(luo_fd_arg, theirs, size, size);                                       \
	SAME_FIELD(luo_fd_arg, theirs, fd, fd);                                           \
	SAME_FIELD(luo_fd_arg, theirs, token, token)
SAME_FD(liveupdate_session_preserve_fd);
SAME_FD(liveupdate_session_retrieve_fd);

SAME(sizeof(struct luo_finish_arg), sizeof(struct liveupdate_session_finish));
SAME_FIELD(luo_finish_arg, liveupdate_session_finish, size, size);
SAME_FIELD(luo_finish_arg, liveupdate_session_finish, reserved, reserved);

SAME(sizeof(struct luo_get_name_arg), sizeof(struct liveupdate_session_get_name));
SAME_FIELD(luo_get_name_arg, liveupdate_session_get_name, size, size);
SAME_FIELD(luo_get_name_arg, liveupdate_session_get_name, reserved, reserved);
SAME_FIELD(luo_get_name_arg, liveupdate_session_get_name, name, name);
