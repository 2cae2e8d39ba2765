//! The rtnetlink shell of netattach: reads, moves and configures links. A netlink socket is
//! bound to the namespace it was created in, so every step runs on a dedicated thread that
//! first enters the namespace and then opens its own connection there.

use super::{
    Guards, InterfaceAddress, InterfaceRoute, InterfaceRule, InterfaceSnapshot, IpFamily, IpPrefix,
    LOCAL_TABLE, MAIN_TABLE, NetAttachError, check_guards, is_link_local_v6, validate_ifname,
    validate_snapshot,
};
use futures::TryStreamExt;
use nix::sched::{CloneFlags, setns};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkUnspec, RouteMessageBuilder};
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// An open network namespace plus the label that error messages use for it.
#[derive(Debug)]
pub struct Netns {
    file: File,
    label: String,
}

impl Netns {
    /// Opens `/proc/<pid>/ns/net`, `/run/netns/<name>` or any other nsfs file.
    pub fn open(path: &Path) -> Result<Self, NetAttachError> {
        let file = File::open(path).map_err(|source| NetAttachError::OpenNamespace {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            file,
            label: path.display().to_string(),
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    /// Device and inode of the namespace; equal identities are the same namespace.
    pub fn identity(&self) -> Result<(u64, u64), NetAttachError> {
        use std::os::unix::fs::MetadataExt;
        let meta = self
            .file
            .metadata()
            .map_err(|source| NetAttachError::OpenNamespace {
                path: self.label.clone().into(),
                source,
            })?;
        Ok((meta.dev(), meta.ino()))
    }
}

/// What [`attach`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachOutcome {
    /// The interface was moved and configured; this is what release must restore.
    Attached(InterfaceSnapshot),
    /// The pod already has an interface of that name (second container of the pod).
    AlreadyPresent,
}

/// A netlink connection inside one namespace, with every request bounded in time.
struct Session<'a> {
    runtime: &'a tokio::runtime::Runtime,
    handle: Handle,
    ns: &'a str,
    timeout: Duration,
}

impl Session<'_> {
    fn run<T>(
        &self,
        what: &'static str,
        ifname: &str,
        request: impl Future<Output = Result<T, rtnetlink::Error>>,
    ) -> Result<T, NetAttachError> {
        match self
            .runtime
            .block_on(async { tokio::time::timeout(self.timeout, request).await })
        {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(NetAttachError::Netlink {
                what,
                ifname: ifname.to_string(),
                ns: self.ns.to_string(),
                source: Box::new(source),
            }),
            Err(_) => Err(NetAttachError::Timeout {
                what,
                ifname: ifname.to_string(),
                ns: self.ns.to_string(),
                after: self.timeout,
            }),
        }
    }

    /// Like [`Session::run`] but "already exists" counts as done, which makes re-applying a
    /// snapshot (retry, crash recovery) idempotent.
    fn run_allow_exists(
        &self,
        what: &'static str,
        ifname: &str,
        request: impl Future<Output = Result<(), rtnetlink::Error>>,
    ) -> Result<(), NetAttachError> {
        match self.run(what, ifname, request) {
            Err(NetAttachError::Netlink { source, .. }) if is_already_exists(&source) => Ok(()),
            other => other,
        }
    }

    fn links(&self, ifname: &str) -> Result<Vec<LinkMessage>, NetAttachError> {
        self.run(
            "listing links",
            ifname,
            self.handle.link().get().execute().try_collect::<Vec<_>>(),
        )
    }

    fn link_named(&self, name: &str) -> Result<Option<LinkMessage>, NetAttachError> {
        Ok(self
            .links(name)?
            .into_iter()
            .find(|link| link_name(link) == Some(name)))
    }

    fn require_link(&self, name: &str) -> Result<LinkMessage, NetAttachError> {
        self.link_named(name)?
            .ok_or_else(|| NetAttachError::NotFound {
                ifname: name.to_string(),
                ns: self.ns.to_string(),
            })
    }

    fn routes(&self, ifname: &str) -> Result<Vec<RouteMessage>, NetAttachError> {
        let mut routes = self.run(
            "listing IPv4 routes",
            ifname,
            self.handle
                .route()
                .get(all_tables(RouteMessageBuilder::<Ipv4Addr>::new().build()))
                .execute()
                .try_collect::<Vec<_>>(),
        )?;
        routes.extend(
            self.run(
                "listing IPv6 routes",
                ifname,
                self.handle
                    .route()
                    .get(all_tables(RouteMessageBuilder::<Ipv6Addr>::new().build()))
                    .execute()
                    .try_collect::<Vec<_>>(),
            )?,
        );
        Ok(routes)
    }

    fn rules(&self, ifname: &str) -> Result<Vec<RuleMessage>, NetAttachError> {
        let mut rules = self.run(
            "listing IPv4 rules",
            ifname,
            self.handle
                .rule()
                .get(IpVersion::V4)
                .execute()
                .try_collect::<Vec<_>>(),
        )?;
        rules.extend(
            self.run(
                "listing IPv6 rules",
                ifname,
                self.handle
                    .rule()
                    .get(IpVersion::V6)
                    .execute()
                    .try_collect::<Vec<_>>(),
            )?,
        );
        Ok(rules)
    }

    /// Adds each rule unless an identical one exists: the kernel answers EEXIST for an
    /// exclusive add of a rule equal in every selector, priority and protocol.
    fn add_rules(&self, ifname: &str, rules: &[InterfaceRule]) -> Result<(), NetAttachError> {
        for rule in rules {
            let mut request = self.handle.rule().add();
            *request.message_mut() = rule_message(rule);
            self.run_allow_exists("adding rule", ifname, request.execute())?;
        }
        Ok(())
    }

    /// Deletes each rule that is there; a missing one is already done.
    fn delete_rules(&self, ifname: &str, rules: &[InterfaceRule]) -> Result<(), NetAttachError> {
        for rule in rules {
            match self.run(
                "deleting rule",
                ifname,
                self.handle.rule().del(rule_message(rule)).execute(),
            ) {
                Err(NetAttachError::Netlink { source, .. })
                    if is_errno(&source, nix::errno::Errno::ENOENT) => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// Sets MTU, adds addresses, brings the link up (when asked) and adds the routes, then
    /// `rules`: the order matters, a gateway route needs its on-link address and an up link.
    fn configure(
        &self,
        index: u32,
        name: &str,
        snapshot: &InterfaceSnapshot,
        rules: &[InterfaceRule],
        up: bool,
    ) -> Result<(), NetAttachError> {
        self.run(
            "setting MTU",
            name,
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).mtu(snapshot.mtu).build())
                .execute(),
        )?;
        for a in &snapshot.addresses {
            self.run_allow_exists(
                "adding address",
                name,
                self.handle
                    .address()
                    .add(index, a.address, a.prefix_len)
                    .execute(),
            )?;
        }
        if up {
            self.run(
                "setting link up",
                name,
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).up().build())
                    .execute(),
            )?;
        }
        for r in &snapshot.routes {
            let message = route_message(index, name, r)?;
            self.run_allow_exists(
                "adding route",
                name,
                self.handle.route().add(message).execute(),
            )?;
        }
        self.add_rules(name, rules)
    }
}

/// Runs `work` with a netlink session inside `ns`, on a thread of its own so that the
/// caller's thread never changes namespace.
fn in_netns<T: Send>(
    ns: &Netns,
    timeout: Duration,
    work: impl FnOnce(&Session<'_>) -> Result<T, NetAttachError> + Send,
) -> Result<T, NetAttachError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(&ns.file, CloneFlags::CLONE_NEWNET).map_err(|source| {
                    NetAttachError::EnterNamespace {
                        ns: ns.label.clone(),
                        source,
                    }
                })?;
                let connection_error = |source| NetAttachError::Connection {
                    ns: ns.label.clone(),
                    source,
                };
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(connection_error)?;
                let (connection, handle, _) = {
                    let _entered = runtime.enter();
                    rtnetlink::new_connection().map_err(connection_error)?
                };
                runtime.spawn(connection);
                work(&Session {
                    runtime: &runtime,
                    handle,
                    ns: &ns.label,
                    timeout,
                })
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetAttachError::WorkerPanicked {
                    ns: ns.label.clone(),
                })
            })
    })
}

/// Whether `ns` has an interface called `name`.
pub fn interface_in_netns(
    ns: &Netns,
    name: &str,
    timeout: Duration,
) -> Result<bool, NetAttachError> {
    in_netns(ns, timeout, |s| Ok(s.link_named(name)?.is_some()))
}

/// Reads what a move would flush from `host_name` in `host` and checks the guards.
pub fn snapshot(
    host: &Netns,
    host_name: &str,
    guards: &Guards,
    timeout: Duration,
) -> Result<InterfaceSnapshot, NetAttachError> {
    validate_ifname(host_name)?;
    let (snapshot, carries_default) = in_netns(host, timeout, |s| read_snapshot(s, host_name))?;
    validate_snapshot(&snapshot)?;
    check_guards(&snapshot, carries_default, guards)?;
    Ok(snapshot)
}

/// Moves `snapshot.host_name` from `host` into `target` as `pod_name` in one RTM_SETLINK, then
/// configures it there. Callers record `snapshot` before calling, so a crash in between is
/// undone by [`release`].
pub fn move_and_configure(
    host: &Netns,
    target: &Netns,
    snapshot: &InterfaceSnapshot,
    pod_name: &str,
    timeout: Duration,
) -> Result<(), NetAttachError> {
    validate_ifname(pod_name)?;
    validate_snapshot(snapshot)?;
    let target_fd = target.file.as_raw_fd();
    in_netns(host, timeout, |s| {
        let link = s.require_link(&snapshot.host_name)?;
        s.run(
            "moving into the pod namespace",
            &snapshot.host_name,
            s.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(link.header.index)
                        .setns_by_fd(target_fd)
                        .name(pod_name.to_string())
                        .build(),
                )
                .execute(),
        )
    })?;
    in_netns(target, timeout, |s| {
        let link = s.require_link(pod_name)?;
        s.configure(
            link.header.index,
            pod_name,
            snapshot,
            &snapshot.pod_rules(pod_name),
            true,
        )
    })
}

/// Attaches `host_name` to `target` as `pod_name`; a pod that already has `pod_name` is left
/// as it is.
pub fn attach(
    host: &Netns,
    target: &Netns,
    host_name: &str,
    pod_name: &str,
    guards: &Guards,
    timeout: Duration,
) -> Result<AttachOutcome, NetAttachError> {
    validate_ifname(pod_name)?;
    if interface_in_netns(target, pod_name, timeout)? {
        return Ok(AttachOutcome::AlreadyPresent);
    }
    let snapshot = snapshot(host, host_name, guards, timeout)?;
    move_and_configure(host, target, &snapshot, pod_name, timeout)?;
    Ok(AttachOutcome::Attached(snapshot))
}

/// Brings the interface recorded in `snapshot` back to `host` under its original name and
/// restores its MTU, addresses, routes (in every table), policy rules and up state; the pod's
/// copies of the rules are deleted. `target` is `None` when the pod's namespace is gone; the
/// kernel then has returned a physical device to the host under the pod-side name, found
/// here by hardware address. Safe to repeat.
pub fn release(
    host: &Netns,
    target: Option<&Netns>,
    snapshot: &InterfaceSnapshot,
    pod_name: &str,
    timeout: Duration,
) -> Result<(), NetAttachError> {
    validate_snapshot(snapshot)?;
    let host_fd = host.file.as_raw_fd();
    let host_name = snapshot.host_name.as_str();
    if let Some(target) = target {
        in_netns(target, timeout, |s| {
            let link = s.link_named(pod_name)?;
            // Namespace inode numbers are reused once a namespace dies: a namespace found by
            // the recorded inode may be a newer pod's, whose own `rdma0` must stay. The
            // hardware address tells ours apart.
            if let (Some(link), Some(mac)) = (&link, snapshot.hardware_address.as_deref())
                && hardware_address(link).is_some_and(|found| found != mac)
            {
                tracing::warn!(interface = pod_name, ns = %s.ns, expected = mac,
                    "namespace holds another interface of that name; not ours to move");
                return Ok(());
            }
            // The table routes leave with the link, the rules would stay behind pointing at
            // a name the pod may reuse.
            s.delete_rules(pod_name, &snapshot.pod_rules(pod_name))?;
            let Some(link) = link else {
                return Ok(());
            };
            s.run(
                "moving back to the host namespace",
                pod_name,
                s.handle
                    .link()
                    .set(
                        LinkUnspec::new_with_index(link.header.index)
                            .setns_by_fd(host_fd)
                            .name(host_name.to_string())
                            .build(),
                    )
                    .execute(),
            )
        })?;
    }
    in_netns(host, timeout, |s| {
        let links = s.links(host_name)?;
        let link = match links
            .iter()
            .find(|l| link_name(l) == Some(host_name))
            .or_else(|| {
                snapshot.hardware_address.as_deref().and_then(|mac| {
                    links
                        .iter()
                        .find(|l| hardware_address(l).as_deref() == Some(mac))
                })
            }) {
            Some(link) => link,
            None => {
                return Err(NetAttachError::NotFound {
                    ifname: host_name.to_string(),
                    ns: s.ns.to_string(),
                });
            }
        };
        let index = link.header.index;
        if link_name(link) != Some(host_name) {
            s.run(
                "renaming back",
                host_name,
                s.handle
                    .link()
                    .set(
                        LinkUnspec::new_with_index(index)
                            .down()
                            .name(host_name.to_string())
                            .build(),
                    )
                    .execute(),
            )?;
        }
        s.configure(index, host_name, snapshot, &snapshot.rules, snapshot.was_up)
    })
}

fn read_snapshot(
    s: &Session<'_>,
    host_name: &str,
) -> Result<(InterfaceSnapshot, bool), NetAttachError> {
    let link = s.require_link(host_name)?;
    let index = link.header.index;
    let mtu = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
        .unwrap_or(1500);
    let address_messages = s.run(
        "listing addresses",
        host_name,
        s.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect::<Vec<_>>(),
    )?;
    let addresses = address_messages
        .iter()
        .filter(|m| m.header.index == index)
        .filter_map(interface_address)
        .filter(|a| !is_link_local_v6(a.address))
        .collect();
    let (routes, carries_default) = select_routes(index, &s.routes(host_name)?);
    let mut snapshot = InterfaceSnapshot {
        host_name: host_name.to_string(),
        mtu,
        hardware_address: hardware_address(&link),
        addresses,
        routes,
        rules: Vec::new(),
        was_up: link.header.flags.contains(LinkFlags::Up),
    };
    let tables = snapshot.own_tables();
    for message in s.rules(host_name)? {
        match interface_rule(&message) {
            Some(rule) if rule.belongs_to(host_name, &tables) => snapshot.rules.push(rule),
            Some(_) => {}
            None if rule_mentions(&message, host_name, &tables) => tracing::warn!(
                interface = host_name,
                rule = ?message,
                "policy rule uses selectors or an action netattach cannot copy; the pod will not get it"
            ),
            None => {}
        }
    }
    Ok((snapshot, carries_default))
}

/// The unicast routes out of `index`, in any table but `local`, that a move loses and that the
/// kernel will not re-create from the addresses, and whether a main-table default route uses
/// the interface. Defaults in other tables are the per-NIC source routing and are kept.
fn select_routes(index: u32, routes: &[RouteMessage]) -> (Vec<InterfaceRoute>, bool) {
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

fn route_message(
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

fn is_already_exists(error: &rtnetlink::Error) -> bool {
    is_errno(error, nix::errno::Errno::EEXIST)
}

fn is_errno(error: &rtnetlink::Error, errno: nix::errno::Errno) -> bool {
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
fn interface_rule(message: &RuleMessage) -> Option<InterfaceRule> {
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
fn rule_mentions(message: &RuleMessage, host_name: &str, tables: &[u32]) -> bool {
    tables.contains(&rule_table(message))
        || message.attributes.iter().any(|a| {
            matches!(a, RuleAttribute::Iifname(n) | RuleAttribute::Oifname(n) if n == host_name)
        })
}

fn rule_message(rule: &InterfaceRule) -> RuleMessage {
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

fn interface_address(message: &AddressMessage) -> Option<InterfaceAddress> {
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

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

fn hardware_address(link: &LinkMessage) -> Option<String> {
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
