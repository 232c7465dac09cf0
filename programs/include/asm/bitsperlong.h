/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* The BPF target is 64-bit: see asm/types.h. */
#ifndef XLB_ASM_BITSPERLONG_H
#define XLB_ASM_BITSPERLONG_H
#define __BITS_PER_LONG 64
#include <asm-generic/bitsperlong.h>
#endif
