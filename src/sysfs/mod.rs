//! Root-relative machine reader: PCI functions, accelerators, NICs/RDMA and NUMA nodes,
//! read from sysfs/procfs into an Inventory.

pub mod roots;

pub use roots::MachineRoots;
