//! Rail assignment: the pure core's `rails` (subnets → stable rail numbers), which the node
//! agent's slice builder shares with the controller.

pub use tandem_core::rails::*;
