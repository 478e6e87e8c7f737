//! CPL0 boot stub: PVH 32-bit entry → long mode → per-CPU GDT/TSS/IDT → `iretq` to CPL3.
//!
//! Kernel-mode code is emulated (slowly) on the PVM KVM this project is developed on, so this
//! stub executes as few instructions as possible: page tables and GDT are static data, the
//! only loops are the 32-entry IDT fill (BSP only). Workloads run at CPL3 with IOPL=3 so they
//! can reach ports directly; interrupts stay masked (RFLAGS.IF=0) and devices are polled.
//!
//! Memory map (identity, 2 MiB pages, user-accessible, A/D bits preset so the CPU never
//! writes page tables): 0–4 GiB.
//!
//! GDT: 0x08 kernel code64, 0x10 kernel data, 0x18 user data, 0x20 user code64,
//! 0x28 kernel code32 (AP trampoline), 0x30 + 16·i TSS of CPU i.

use core::arch::global_asm;

pub const MAX_CPUS: usize = 8;
pub const KSTACK_SHIFT: u32 = 14; // 16 KiB kernel stack per CPU
pub const USTACK_SHIFT: u32 = 18; // 256 KiB user stack per CPU

#[repr(C, align(4096))]
pub struct Stacks<const N: usize>(pub [u8; N]);

#[no_mangle]
#[used]
static mut KSTACKS: Stacks<{ MAX_CPUS << KSTACK_SHIFT }> = Stacks([0; MAX_CPUS << KSTACK_SHIFT]);
#[no_mangle]
#[used]
static mut USTACKS: Stacks<{ MAX_CPUS << USTACK_SHIFT }> = Stacks([0; MAX_CPUS << USTACK_SHIFT]);

global_asm!(
    r#"
    .set MAX_CPUS, 8
    /* TSS (104 bytes) + I/O permission bitmap (8192 bytes, all zero = every port allowed)
       + the terminating 0xff byte, rounded up. */
    .set TSS_STRIDE, 0x2100
    .set TSS_LIMIT, 104 + 8192

    /* ---- PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY ---- */
    .section .note.pvh, "a"
    .p2align 2
    .long 4, 4, 18
    .asciz "Xen"
    .long pvh_start32

    /* ---- static page tables: identity map 0..4 GiB, 2 MiB pages, P|RW|US|A|D ---- */
    .section .data.pagetables, "aw"
    .p2align 12
    .global pml4
pml4:
    .quad pdpt + 0x27
    .fill 511, 8, 0
pdpt:
    .quad pd0 + 0x27, pd0 + 0x1027, pd0 + 0x2027, pd0 + 0x3027
    .fill 508, 8, 0
pd0:
    .set addr, 0
    .rept 2048
    .quad addr | 0xE7
    .set addr, addr + 0x200000
    .endr

    /* ---- GDT ---- */
    .section .data.gdt, "aw"
    .p2align 4
    .global gdt
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF   /* 0x08 kernel code 64 */
    .quad 0x00CF92000000FFFF   /* 0x10 kernel data    */
    .quad 0x00CFF2000000FFFF   /* 0x18 user data      */
    .quad 0x00AFFA000000FFFF   /* 0x20 user code 64   */
    .quad 0x00CF9A000000FFFF   /* 0x28 kernel code 32 */
    .fill MAX_CPUS * 2, 8, 0   /* 0x30 TSS descriptors, filled per CPU */
gdt_end:
    .p2align 3
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
idt_ptr:
    .word 32 * 16 - 1
    .quad idt
    .global start_info_ptr
start_info_ptr:
    .quad 0
    .global next_cpu
next_cpu:
    .long 0

    .section .bss.idt, "aw", @nobits
    .p2align 4
idt:
    .skip 32 * 16
    .p2align 12
tss_area:
    .skip MAX_CPUS * TSS_STRIDE

    /* ---- 32-bit entry (PVH: flat protected mode, paging off, EBX = start_info) ---- */
    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, start_info_ptr
enter_long32:
    lgdt gdt_ptr
    mov %cr4, %eax
    or $0x620, %eax              /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx        /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    and $0x9FFFFFFB, %eax        /* clear CD, NW, EM */
    or $0x80000023, %eax         /* PG | NE | MP | PE */
    mov %eax, %cr0
    ljmp $0x08, $start64

    .global ap_start32
ap_start32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    jmp enter_long32

    .code64
start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov $1, %ebx
    lock xadd %ebx, next_cpu(%rip)
    cmp $MAX_CPUS, %ebx
    jae park
    /* kernel stack top = KSTACKS + (cpu + 1) << 14 */
    lea 1(%rbx), %rdx
    shl $14, %rdx
    lea KSTACKS(%rip), %rcx
    add %rcx, %rdx
    mov %rdx, %rsp
    test %ebx, %ebx
    jnz 2f
    /* BSP: fill the 32 exception gates */
    lea idt(%rip), %rdi
    lea isr_stubs(%rip), %rax
    mov $32, %ecx
1:
    mov %rax, %rdx
    and $0xffff, %edx
    or $0x00080000, %edx         /* selector 0x08 */
    mov %rax, %r8
    shr $16, %r8
    shl $48, %r8
    or %r8, %rdx
    mov $0x8E, %r8d              /* present, DPL0, interrupt gate */
    shl $40, %r8
    or %r8, %rdx
    mov %rdx, (%rdi)
    mov %rax, %rdx
    shr $32, %rdx
    mov %rdx, 8(%rdi)
    add $16, %rdi
    add $16, %rax
    dec %ecx
    jnz 1b
2:
    /* TSS of this CPU: RSP0 = kernel stack top; an I/O bitmap allowing every port, because
       not every hypervisor honours RFLAGS.IOPL for CPL3 (PVM does not) */
    imul $TSS_STRIDE, %rbx, %rax
    lea tss_area(%rip), %rcx
    add %rcx, %rax
    mov %rsp, 4(%rax)
    movw $104, 102(%rax)
    movb $0xff, TSS_LIMIT(%rax)
    mov %rax, %rcx
    and $0xffffff, %rcx
    shl $16, %rcx
    or $TSS_LIMIT, %rcx
    mov $0x89, %edx
    shl $40, %rdx
    or %rdx, %rcx
    mov %rax, %rdx
    shr $24, %rdx
    and $0xff, %edx
    shl $56, %rdx
    or %rdx, %rcx
    mov %rbx, %rdx
    shl $4, %rdx
    lea gdt(%rip), %r8
    add %rdx, %r8
    mov %rcx, 0x30(%r8)
    shr $32, %rax
    mov %rax, 0x38(%r8)
    lea 0x30(%rdx), %rax
    ltr %ax
    lidt idt_ptr(%rip)
    /* iretq to CPL3: user stack top = USTACKS + (cpu + 1) << 18, minus 8 (call alignment) */
    lea 1(%rbx), %rdx
    shl $18, %rdx
    lea USTACKS(%rip), %rcx
    add %rcx, %rdx
    sub $8, %rdx
    push $0x1b
    push %rdx
    push $0x3002                 /* IOPL=3, IF=0 */
    push $0x23
    lea rt_user_entry(%rip), %rax
    push %rax
    mov start_info_ptr(%rip), %rdi
    mov %rbx, %rsi
    iretq

park:
    hlt
    jmp park

    /* ---- exception stubs: 16 bytes each, push (error code,) vector ---- */
    .p2align 4
isr_stubs:
    .set vec, 0
    .rept 32
    .p2align 4
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    push $0
    .endif
    push $vec
    jmp isr_common
    .set vec, vec + 1
    .endr
isr_common:
    mov (%rsp), %rdi
    mov %rsp, %rsi
    and $-16, %rsp
    call rt_guest_fault
    jmp park

    /* ---- AP trampoline: copied to a page below 1 MiB, entered by SIPI in real mode ---- */
    .section .rodata.ap_tramp, "a"
    .code16
    .global ap_tramp_start
    .global ap_tramp_end
ap_tramp_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (ap_tramp_gdtr - ap_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x28, $ap_start32
    .p2align 3
ap_tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:
    .code64
"#,
    options(att_syntax)
);
