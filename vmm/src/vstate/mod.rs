//! KVM objects: the VM ([`vm`]) and its vCPUs ([`vcpu`]).
pub mod dirty_ring;
pub mod vcpu;
pub mod vm;
