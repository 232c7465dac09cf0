/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* The BPF target's asm/types.h: the kernel's generic integer types (what
 * every architecture's uapi asm/types.h includes), so the programs build
 * against the uapi headers of linux-libc-dev without an architecture's
 * include directory. */
#ifndef XLB_ASM_TYPES_H
#define XLB_ASM_TYPES_H
#include <asm-generic/types.h>
#endif
