//! The netattach steps built on sessions: look up, snapshot, move and configure, attach and
//! release an interface, each on a thread that enters the namespace it works in.

use super::messages::{
    hardware_address, interface_address, interface_rule, link_name, rule_mentions, select_routes,
};
use super::session::Session;
use super::{AttachOutcome, Netns};
use crate::netattach::{
    Guards, InterfaceSnapshot, NetAttachError, check_guards, is_link_local_v6, validate_ifname,
    validate_snapshot,
};
use futures::TryStreamExt;
use nix::sched::{CloneFlags, setns};
use rtnetlink::LinkUnspec;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use std::os::fd::AsRawFd;
use std::time::Duration;

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
