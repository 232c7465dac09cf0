/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* The programs are built for bpfel, little-endian: see asm/types.h. */
#ifndef XLB_ASM_BYTEORDER_H
#define XLB_ASM_BYTEORDER_H
#include <linux/byteorder/little_endian.h>
#endif
