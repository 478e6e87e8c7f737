//! Model-specific registers: the boot values, and the list to save/restore.
use kvm_bindings::kvm_msr_entry;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_APICBASE: u32 = 0x1b;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// MSR values every vCPU starts with (as Firecracker and QEMU set them).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Orders a saved MSR list for restore: TSC before TSC_DEADLINE (a deadline is relative to the
/// TSC it is written against), everything else in its saved order.
pub fn restore_order(msrs: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let mut out: Vec<kvm_msr_entry> = msrs
        .iter()
        .copied()
        .filter(|m| m.index == MSR_IA32_TSC)
        .collect();
    out.extend(
        msrs.iter()
            .copied()
            .filter(|m| m.index != MSR_IA32_TSC && m.index != MSR_IA32_TSC_DEADLINE),
    );
    out.extend(
        msrs.iter()
            .copied()
            .filter(|m| m.index == MSR_IA32_TSC_DEADLINE),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_is_restored_first_and_deadline_last() {
        let e = |index| kvm_msr_entry {
            index,
            ..Default::default()
        };
        let saved = [
            e(MSR_IA32_TSC_DEADLINE),
            e(MSR_STAR),
            e(MSR_IA32_TSC),
            e(MSR_LSTAR),
        ];
        let order: Vec<u32> = restore_order(&saved).iter().map(|m| m.index).collect();
        assert_eq!(
            order,
            vec![MSR_IA32_TSC, MSR_STAR, MSR_LSTAR, MSR_IA32_TSC_DEADLINE]
        );
    }
}
