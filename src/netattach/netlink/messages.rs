//! Conversions between rtnetlink messages and netattach's snapshot types: which routes and
//! rules belong to an interface, and how to write them back. Pure, no socket.

use crate::netattach::{
    InterfaceAddress, InterfaceRoute, InterfaceRule, IpFamily, IpPrefix, LOCAL_TABLE, MAIN_TABLE,
    NetAttachError, is_link_local_v6,
};
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The unicast routes out of `index`, in any table but `local`, that a move loses and that the
/// kernel will not re-create from the addresses, and whether a main-table default route uses
/// the interface. Defaults in other tables are the per-NIC source routing and are kept.
pub(super) fn select_routes(index: u32, routes: &[RouteMessage]) -> (Vec<InterfaceRoute>, bool) {
    let mut selected = Vec::new();
    let mut carries_default = false;
    for route in routes {
        let table = crate::netattach::route_table(route);
        let uses_interface = route.attributes.iter().any(|a| match a {
            RouteAttribute::Oif(oif) => *oif == index,
            RouteAttribute::MultiPath(hops) => hops.iter().any(|h| h.interface_index == index),
            _ => false,
        });
        if table == u32::from(RouteHeader::RT_TABLE_UNSPEC)
            || table == LOCAL_TABLE
            || !uses_interface
        {
            continue;
        }
        if table == MAIN_TABLE && route.header.destination_prefix_length == 0 {
            carries_default = true;
            continue;
        }
        if route.header.kind != RouteType::Unicast || route.header.protocol == RouteProtocol::Kernel
        {
            continue;
        }
        // A default route carries no destination attribute; its family is in the header.
        let Some(destination) = route
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Destination(d) => route_ip(d),
                _ => None,
            })
            .or_else(|| unspecified_of(route.header.address_family))
        else {
            continue;
        };
        if is_link_local_v6(destination) {
            continue;
        }
        selected.push(InterfaceRoute {
            destination,
            prefix_len: route.header.destination_prefix_length,
            gateway: route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(g) => route_ip(g),
                _ => None,
            }),
            metric: route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Priority(p) => Some(*p),
                _ => None,
            }),
            table: (table != MAIN_TABLE).then_some(table),
        });
    }
    (selected, carries_default)
}

pub(super) fn route_message(
    index: u32,
    ifname: &str,
    route: &InterfaceRoute,
) -> Result<RouteMessage, NetAttachError> {
    let invalid = |e: &dyn std::fmt::Display| NetAttachError::InvalidConfig {
        ifname: ifname.to_string(),
        what: format!("route {}/{}", route.destination, route.prefix_len),
        reason: e.to_string(),
    };
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.destination, route.prefix_len)
        .map_err(|e| invalid(&e))?;
    if let Some(gateway) = route.gateway {
        builder = builder.gateway(gateway).map_err(|e| invalid(&e))?;
    }
    builder = builder.output_interface(index).table_id(route.table_id());
    if let Some(metric) = route.metric {
        builder = builder.priority(metric);
    }
    Ok(builder.build())
}

pub(super) fn is_already_exists(error: &rtnetlink::Error) -> bool {
    is_errno(error, nix::errno::Errno::EEXIST)
}

pub(super) fn is_errno(error: &rtnetlink::Error, errno: nix::errno::Errno) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(msg)
        if msg.to_io().raw_os_error() == Some(errno as i32))
}

/// A route dump request for every table: the builder's default (main) would otherwise
/// filter on kernels that check dump requests strictly, and without strict checking the
/// kernel ignores the table filter anyway, so callers filter the answer themselves.
pub fn all_tables(mut message: RouteMessage) -> RouteMessage {
    message.header.table = RouteHeader::RT_TABLE_UNSPEC;
    message
        .attributes
        .retain(|a| !matches!(a, RouteAttribute::Table(_)));
    message
}

fn unspecified_of(family: AddressFamily) -> Option<IpAddr> {
    match family {
        AddressFamily::Inet => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        AddressFamily::Inet6 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        _ => None,
    }
}

fn rule_table(message: &RuleMessage) -> u32 {
    message
        .attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(message.header.table))
}

/// Reads a kernel rule into an [`InterfaceRule`], or `None` when it is not a plain "look up
/// this table" rule or uses a selector that type does not carry (copying it without that
/// selector would widen it).
pub(super) fn interface_rule(message: &RuleMessage) -> Option<InterfaceRule> {
    let header = &message.header;
    let family = match header.family {
        AddressFamily::Inet => IpFamily::Ipv4,
        AddressFamily::Inet6 => IpFamily::Ipv6,
        _ => return None,
    };
    let table = rule_table(message);
    if header.action != RuleAction::ToTable
        || header.tos != 0
        || header.flags.contains(RuleFlags::Invert)
        || table == u32::from(RouteHeader::RT_TABLE_UNSPEC)
        || table == LOCAL_TABLE
    {
        return None;
    }
    let mut rule = InterfaceRule {
        family,
        priority: 0,
        table,
        from: None,
        to: None,
        iif: None,
        oif: None,
        fwmark: None,
        fwmask: None,
        protocol: None,
    };
    for attribute in &message.attributes {
        match attribute {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::Table(_) => {}
            RuleAttribute::Source(address) => {
                rule.from = Some(IpPrefix {
                    address: *address,
                    prefix_len: header.src_len,
                })
            }
            RuleAttribute::Destination(address) => {
                rule.to = Some(IpPrefix {
                    address: *address,
                    prefix_len: header.dst_len,
                })
            }
            RuleAttribute::Iifname(name) => rule.iif = Some(name.clone()),
            RuleAttribute::Oifname(name) => rule.oif = Some(name.clone()),
            RuleAttribute::FwMark(mark) => rule.fwmark = Some(*mark),
            RuleAttribute::FwMask(mask) => rule.fwmask = Some(*mask),
            RuleAttribute::Protocol(protocol) => {
                rule.protocol = Some(u8::from(*protocol)).filter(|p| *p != 0)
            }
            RuleAttribute::L3MDev(false) => {}
            // Some kernels always report the suppressors, with -1 for "not set".
            RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            // The kernel reports these only when set: each narrows what the rule matches.
            _ => return None,
        }
    }
    Some(rule)
}

/// Whether a rule [`interface_rule`] could not read is still about the interface, so that
/// leaving it behind is worth a warning.
pub(super) fn rule_mentions(message: &RuleMessage, host_name: &str, tables: &[u32]) -> bool {
    tables.contains(&rule_table(message))
        || message.attributes.iter().any(|a| {
            matches!(a, RuleAttribute::Iifname(n) | RuleAttribute::Oifname(n) if n == host_name)
        })
}

pub(super) fn rule_message(rule: &InterfaceRule) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = match rule.family {
        IpFamily::Ipv4 => AddressFamily::Inet,
        IpFamily::Ipv6 => AddressFamily::Inet6,
    };
    message.header.action = RuleAction::ToTable;
    // The header holds 8 bits; FRA_TABLE, which the kernel prefers, holds the real id.
    message.header.table = u8::try_from(rule.table).unwrap_or(RT_TABLE_COMPAT);
    message.attributes.push(RuleAttribute::Table(rule.table));
    message
        .attributes
        .push(RuleAttribute::Priority(rule.priority));
    if let Some(from) = rule.from {
        message.header.src_len = from.prefix_len;
        message.attributes.push(RuleAttribute::Source(from.address));
    }
    if let Some(to) = rule.to {
        message.header.dst_len = to.prefix_len;
        message
            .attributes
            .push(RuleAttribute::Destination(to.address));
    }
    if let Some(iif) = &rule.iif {
        message.attributes.push(RuleAttribute::Iifname(iif.clone()));
    }
    if let Some(oif) = &rule.oif {
        message.attributes.push(RuleAttribute::Oifname(oif.clone()));
    }
    if let Some(mark) = rule.fwmark {
        message.attributes.push(RuleAttribute::FwMark(mark));
    }
    if let Some(mask) = rule.fwmask {
        message.attributes.push(RuleAttribute::FwMask(mask));
    }
    if let Some(protocol) = rule.protocol {
        message
            .attributes
            .push(RuleAttribute::Protocol(RouteProtocol::from(protocol)));
    }
    message
}

/// `RT_TABLE_COMPAT`: what the 8-bit header says when the table id does not fit.
const RT_TABLE_COMPAT: u8 = 252;

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The interface's own address and prefix length in one RTM_NEWADDR message.
pub fn interface_address(message: &AddressMessage) -> Option<InterfaceAddress> {
    // IPv4 reports the interface's own address as IFA_LOCAL (IFA_ADDRESS is the peer on
    // point-to-point links); IPv6 has only IFA_ADDRESS.
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = local.or_else(|| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })?;
    Some(InterfaceAddress {
        address,
        prefix_len: message.header.prefix_len,
    })
}

pub(super) fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

pub(super) fn hardware_address(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) if !bytes.is_empty() => Some(
            bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
        ),
        _ => None,
    })
}
