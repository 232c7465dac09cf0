/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* See asm/types.h. */
#ifndef XLB_ASM_POSIX_TYPES_H
#define XLB_ASM_POSIX_TYPES_H
#include <asm-generic/posix_types.h>
#endif
