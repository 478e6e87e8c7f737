//! x86_64 architecture setup: CPUID, boot MSRs, boot registers, MP table.
pub mod cpuid;
pub mod mptable;
pub mod msr;
pub mod regs;
