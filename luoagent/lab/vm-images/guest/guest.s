# luoguest: a bare-metal x86 test guest that counts in RAM and reports on COM1.
# Built with GNU as/ld (see guest.ld and luoagent/lab/guest.py); booted by QEMU
# with `-kernel guest.elf` through its multiboot (v1) loader, entered in 32-bit flat
# protected mode with interrupts off.
#
# Guest-physical memory contract (tests read it straight from the RAM memfd):
#   0x00100000..      this image (code, data, stack), kept below 0x00200000 by guest.ld
#   0x00200000 +0  u32 magic 0x474f554c ("LUOG" in memory), written after the fields below
#              +4  u32 layout version (1)
#              +8  u64 counter: +1 per loop iteration, forever
#              +16 u64 ticks: +1 each time the RTC seconds register changes (one line each)
#   0x01000000..0x02ffffff (16..48 MiB): never touched; reserved for a test canary
#                     (SeaBIOS writes below top-of-RAM - 16 MiB: give the guest >= 128 MiB)
#
# Every RTC second the guest prints "luoguest counter=<decimal> tick=<decimal>\n" on COM1;
# at boot it prints "luoguest start\n" once, so a reset shows up in the serial log.
# All state lives in registers and RAM, both of which survive a cpr-reboot migration; the
# guest loads its own GDT so it depends on no table QEMU's boot ROM left in memory.

        .set MB_MAGIC,      0x1BADB002
        .set MB_FLAGS,      0x00000000
        .set MB_CHECKSUM,   -(MB_MAGIC + MB_FLAGS)

        .set STATE,         0x00200000
        .set STATE_MAGIC,   0x474f554c
        .set STATE_VERSION, 1
        .set COUNTER_LO,    STATE + 8
        .set COUNTER_HI,    STATE + 12
        .set TICKS_LO,      STATE + 16
        .set TICKS_HI,      STATE + 20

        .set COM1,          0x3f8
        .set COM1_LSR,      0x3fd
        .set CMOS_INDEX,    0x70
        .set CMOS_DATA,     0x71
        # iterations between two RTC reads: port I/O is costly under nested TCG
        .set BATCH,         4096

        .section .multiboot, "a"
        .balign 4
        .long MB_MAGIC, MB_FLAGS, MB_CHECKSUM

        .text
        .code32
        .globl _start
_start:
        cli
        lgdt    gdt_descriptor
        ljmp    $0x08, $reload_segments
reload_segments:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    %ax, %fs
        movw    %ax, %gs
        movl    $stack_top, %esp

        # zero the fields first, then publish the magic: a reader that sees the magic
        # sees initialised counters
        movl    $0, STATE
        movl    $STATE_VERSION, STATE + 4
        movl    $0, COUNTER_LO
        movl    $0, COUNTER_HI
        movl    $0, TICKS_LO
        movl    $0, TICKS_HI
        movl    $STATE_MAGIC, STATE

        movl    $msg_start, %esi
        call    puts
        call    rtc_seconds
        movb    %al, %bl                # %bl: last RTC seconds value seen

main_loop:
        movl    $BATCH, %ecx
count:
        addl    $1, COUNTER_LO
        adcl    $0, COUNTER_HI
        decl    %ecx
        jnz     count

        call    rtc_seconds
        cmpb    %al, %bl
        je      main_loop
        movb    %al, %bl
        addl    $1, TICKS_LO
        adcl    $0, TICKS_HI

        movl    $msg_counter, %esi
        call    puts
        movl    COUNTER_LO, %eax
        movl    COUNTER_HI, %edx
        call    put_u64
        movl    $msg_tick, %esi
        call    puts
        movl    TICKS_LO, %eax
        movl    TICKS_HI, %edx
        call    put_u64
        movb    $'\n', %al
        call    putc
        jmp     main_loop

# %al <- CMOS register 0 (RTC seconds); any change means a second passed
rtc_seconds:
        movb    $0x00, %al
        outb    %al, $CMOS_INDEX
        inb     $CMOS_DATA, %al
        ret

# write %al to COM1 once its transmit holding register is empty
putc:
        pushl   %edx
        pushl   %eax
        movw    $COM1_LSR, %dx
1:      inb     %dx, %al
        testb   $0x20, %al
        jz      1b
        popl    %eax
        movw    $COM1, %dx
        outb    %al, %dx
        popl    %edx
        ret

# write the NUL-terminated string at %esi
puts:
        pushl   %eax
        pushl   %esi
1:      movb    (%esi), %al
        testb   %al, %al
        jz      2f
        call    putc
        incl    %esi
        jmp     1b
2:      popl    %esi
        popl    %eax
        ret

# write %edx:%eax in decimal; 64-bit by 10 as two 32-bit divides (high word first, its
# remainder < 10 keeps the second quotient within 32 bits)
put_u64:
        pushal
        movl    $digits_end, %edi
        movl    $10, %ecx
1:      movl    %eax, %esi              # low word
        movl    %edx, %eax
        xorl    %edx, %edx
        divl    %ecx                    # high / 10
        movl    %eax, %ebx              # new high word
        movl    %esi, %eax
        divl    %ecx                    # (rem:low) / 10
        addb    $'0', %dl
        decl    %edi
        movb    %dl, (%edi)
        movl    %ebx, %edx
        movl    %eax, %esi
        orl     %edx, %esi
        jnz     1b
2:      movb    (%edi), %al
        call    putc
        incl    %edi
        cmpl    $digits_end, %edi
        jne     2b
        popal
        ret

        .section .rodata
msg_start:      .asciz "luoguest start\n"
msg_counter:    .asciz "luoguest counter="
msg_tick:       .asciz " tick="

        .balign 8
gdt:
        .quad   0x0000000000000000      # null
        .quad   0x00cf9a000000ffff      # 0x08: 32-bit code, base 0, 4 GiB
        .quad   0x00cf92000000ffff      # 0x10: 32-bit data, base 0, 4 GiB
gdt_end:
gdt_descriptor:
        .word   gdt_end - gdt - 1
        .long   gdt

        .bss
        .balign 16
digits:         .skip 24
digits_end:
        .balign 16
stack:          .skip 4096
stack_top:
