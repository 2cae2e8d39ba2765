//! The RDMA-netlink shell of netattach: when the kernel's RDMA subsystem runs in `exclusive`
//! netns mode an HCA (`mlx5_0`) is visible in one network namespace only, so giving a pod its
//! NIC means moving the RDMA device too — what `rdma dev set mlx5_0 netns <ns>` does.
//! Message encoding and decoding are pure (`wire`); [`RdmaNetlink`] is the thin socket around
//! them (`socket`).

mod socket;
#[cfg(test)]
mod tests;
mod wire;

pub use socket::{
    RdmaError, RdmaMove, RdmaNetlink, move_rdma_device, netns_mode_in, validate_device_name,
};
pub use wire::{
    Attribute, DataMessage, DecodeError, Message, RDMA_NLDEV_ATTR_DEV_INDEX,
    RDMA_NLDEV_ATTR_DEV_NAME, RDMA_NLDEV_NET_NS_FD, RDMA_NLDEV_SYS_ATTR_NETNS_MODE, RdmaDevice,
    RdmaNetnsMode, ReplyCollector, ReplyError, RequestKind, decode_attributes, decode_messages,
    devices_from_dump, encode_attribute, encode_request,
};
