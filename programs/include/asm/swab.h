/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* See asm/types.h: no architecture-specific byte swaps. */
#ifndef XLB_ASM_SWAB_H
#define XLB_ASM_SWAB_H
#endif
